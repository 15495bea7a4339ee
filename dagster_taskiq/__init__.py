"""Dagster executor and run launcher on taskiq over Redis (a port of dagster-celery).

The public names are imported on first use (PEP 562), so commands that only talk to Redis
(``dagster-taskiq worker list``, the compose healthchecks) start without importing Dagster.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster_taskiq.executor import TaskiqExecutor, taskiq_executor
    from dagster_taskiq.launcher import TaskiqRunLauncher

__all__ = ["TaskiqExecutor", "TaskiqRunLauncher", "taskiq_executor"]

_HOMES = {"TaskiqExecutor": "executor", "taskiq_executor": "executor",
          "TaskiqRunLauncher": "launcher"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'dagster_taskiq' has no attribute {name!r}")
    value = getattr(import_module(f"dagster_taskiq.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
