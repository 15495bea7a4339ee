"""The taskiq queues of this project; compose.yaml runs one worker service per queue.

Route a step with the op tag ``dagster-taskiq/queue``; untagged steps go to ``DEFAULT_QUEUE``.
To add a queue, add it here and add a ``worker-<queue>`` service to compose.yaml (see README).
"""

DEFAULT_QUEUE = "dagster"
QUEUES: tuple[str, ...] = ("short", "long")
ALL_QUEUES: tuple[str, ...] = (DEFAULT_QUEUE, *QUEUES)
