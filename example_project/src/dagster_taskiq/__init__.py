"""Dagster executor and run launcher on taskiq over Redis (a port of dagster-celery)."""

from dagster_taskiq.executor import TaskiqExecutor, taskiq_executor
from dagster_taskiq.launcher import TaskiqRunLauncher

__all__ = ["TaskiqExecutor", "TaskiqRunLauncher", "taskiq_executor"]
