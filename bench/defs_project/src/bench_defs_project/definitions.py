"""The code location, as the template defines it: every module under ``defs/`` is loaded."""

import os
import time
from pathlib import Path

import dagster as dg


def _record_load() -> None:
    """For the benchmark: one line per load of the folder (``role pid monotonic``) appended to
    ``$BENCH_DEFS_LOAD_LOG`` when set (``$BENCH_ROLE``: orchestrator or worker); else nothing."""
    path = os.environ.get("BENCH_DEFS_LOAD_LOG")
    if path:
        line = f"{os.environ.get('BENCH_ROLE', '?')} {os.getpid()} {time.monotonic():.6f}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write on O_APPEND: lines never interleave
        finally:
            os.close(fd)


@dg.definitions
def defs() -> dg.Definitions:
    _record_load()
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
