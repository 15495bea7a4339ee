"""Compute-log mirroring on a thread instead of helper processes (installed in workers only).

Dagster's file-based compute log managers (``LocalComputeLogManager``, and the cloud ones,
which capture to a local file first) redirect a step's stdout/stderr into a file and mirror
that file back to the process's own streams with ``tail -F`` plus a Python watcher process that
kills the ``tail`` if the step process is orphaned: four processes started and stopped per step,
which on a worker cost more than the step itself (tens of ms of latency and of CPU per step).

Every task a worker runs lives in a child process of its own, so a thread of that child can do
the tail's job: it copies what the step writes to the file onto the original stream, and it
cannot be orphaned because it dies with the process. The captured files are exactly the same;
only who copies them to the worker's output changes.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from typing import IO

POLL_SECONDS = 0.1  # how often the thread looks for new output (tail -F: every second)
_CHUNK = 65536


def _fileno(stream: IO) -> int | None:
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None
    return fd if isinstance(fd, int) else None


def _pump(path: str, out_fd: int, stop: threading.Event) -> None:
    """Copy ``path`` to ``out_fd`` as it grows, from its start; after ``stop``, copy the rest.
    If the destination goes away (a closed pipe), mirroring stops; the capture goes on."""
    with open(path, "rb", buffering=0) as source:
        while True:
            stopping = stop.is_set()
            chunk = source.read(_CHUNK)
            while chunk:
                view = memoryview(chunk)
                try:
                    while view:
                        view = view[os.write(out_fd, view):]
                except OSError:
                    return
                chunk = source.read(_CHUNK)
            if stopping:
                return
            stop.wait(POLL_SECONDS)


@contextlib.contextmanager
def tail_on_thread(path: str, stream: IO) -> Iterator[tuple[None, None]]:
    """Drop-in for ``dagster._core.execution.compute_logs.tail_to_stream``: entered before the
    stream is redirected into ``path``, left after it is restored."""
    fd = _fileno(stream)
    if fd is None:
        yield (None, None)
        return
    out_fd = os.dup(fd)  # the stream's real destination, before the redirect replaces it
    stop = threading.Event()
    thread = threading.Thread(target=_pump, args=(path, out_fd, stop),
                              name="dagster-taskiq-log-mirror", daemon=True)
    thread.start()
    try:
        yield (None, None)
    finally:
        stop.set()
        thread.join(timeout=10)
        if not thread.is_alive():  # else it is stuck writing to a full pipe: leave its fd be
            os.close(out_fd)


def install() -> bool:
    """Make this process (and the children it forks) mirror compute logs on a thread.
    Returns False, changing nothing, if this Dagster version is not shaped as expected."""
    try:
        from dagster._core.execution import compute_logs
    except ImportError:
        return False
    if not callable(getattr(compute_logs, "tail_to_stream", None)) or not callable(
        getattr(compute_logs, "mirror_stream_to_file", None)
    ):
        return False
    compute_logs.tail_to_stream = tail_on_thread  # mirror_stream_to_file looks it up per call
    return True
