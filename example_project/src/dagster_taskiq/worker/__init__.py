"""The worker: :mod:`.main` (queues, leases, registry), :mod:`.runner` (its side of the zygote),
:mod:`.zygote` (the clean process tasks fork from), :mod:`.steps` (what a task runs),
:mod:`.code` (definitions kept per code version, and the files they came from).

Names are imported on first use, so the zygote (``python -m dagster_taskiq.worker.zygote``)
loads none of the worker's broker machinery.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster_taskiq.worker.main import WorkerCrashed, WorkerOptions, run_worker

__all__ = ["WorkerCrashed", "WorkerOptions", "run_worker"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'dagster_taskiq.worker' has no attribute {name!r}")
    value = getattr(import_module("dagster_taskiq.worker.main"), name)
    globals()[name] = value
    return value
