"""Dagster executor and run launcher on taskiq over Redis (a port of dagster-celery)."""

from dagster_taskiq.executor import TaskiqExecutor, taskiq_executor

__all__ = ["TaskiqExecutor", "taskiq_executor"]
