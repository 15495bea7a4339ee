"""Fan-out/fan-in over every queue: each branch is tagged with a queue and a step priority.

Higher priorities leave a queue first; a step runs only on a worker listening on its queue.
"""

import dagster as dg
from dagster_taskiq.tags import TASKIQ_PRIORITY_TAG, TASKIQ_QUEUE_TAG

from my_dagster_project.queues import ALL_QUEUES

# Two branches per queue, one urgent and one that may wait.
BRANCHES: tuple[tuple[str, int], ...] = tuple(
    (queue, priority) for queue in ALL_QUEUES for priority in (9, 1)
)


@dg.op
def make_numbers() -> list[int]:
    return list(range(1, 101))


def branch_op(queue: str, priority: int) -> dg.OpDefinition:
    """One branch: sums the squares of its share of the numbers, on ``queue``."""
    name = f"square_on_{queue.replace('-', '_')}_p{priority}"

    @dg.op(name=name, tags={TASKIQ_QUEUE_TAG: queue, TASKIQ_PRIORITY_TAG: str(priority)})
    def _branch(context: dg.OpExecutionContext, numbers: list[int]) -> int:
        context.log.info(f"{name}: queue {queue}, priority {priority}")
        return sum(n * n for n in numbers[priority::10])

    return _branch


BRANCH_OPS = [branch_op(queue, priority) for queue, priority in BRANCHES]


@dg.op
def total(context: dg.OpExecutionContext, parts: list[int]) -> int:
    result = sum(parts)
    context.log.info(f"{len(parts)} branches summed to {result}")
    return result


@dg.job(description="Fan out to every queue with high and low step priorities, then fan in.")
def fan_out() -> None:
    numbers = make_numbers()
    total([branch(numbers) for branch in BRANCH_OPS])
