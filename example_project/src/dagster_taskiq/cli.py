"""The ``dagster-taskiq`` command."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import click
import yaml
from dagster import DagsterInvalidConfigError

from dagster_taskiq.config import DEFAULT_QUEUE, BrokerSettings


def executor_config_from_yaml(path: str | None) -> dict[str, Any]:
    """The ``execution.config`` block of a run-config YAML (empty when no file is given)."""
    if not path:
        return {}
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise click.BadParameter(f"{path} does not hold a YAML mapping.", param_hint="-y")
    execution = loaded.get("execution") or {}
    config = execution.get("config") or (execution.get("taskiq") or {}).get("config") or {}
    if not isinstance(config, dict):
        raise click.BadParameter(f"{path}: execution.config must be a mapping.", param_hint="-y")
    return config


def _resolve_env(value: Any) -> Any:
    """Dagster's ``{env: NAME}`` form, so the worker YAML can be the executor's own config."""
    import os

    if isinstance(value, dict) and set(value) == {"env"}:
        return os.environ.get(value["env"])
    return value


def settings_from_yaml(path: str | None) -> tuple[BrokerSettings, list[str]]:
    config = executor_config_from_yaml(path)
    try:
        settings = BrokerSettings.from_config(
            _resolve_env(config.get("broker")),
            _resolve_env(config.get("backend")),
            config.get("config_source"),
        )
    except DagsterInvalidConfigError as exc:
        raise click.ClickException(f"{path or 'configuration'}: {exc}") from None
    return settings, list(config.get("include") or [])


@click.group(help="Run and inspect dagster-taskiq workers.")
def main() -> None:
    pass


@main.group(help="Start and manage workers.")
def worker() -> None:
    pass


@worker.command(name="start", help="Start a dagster taskiq worker.")
@click.option("-n", "--name", default=None, help="Worker name (default: dagster-<random>).")
@click.option("-y", "--config-yaml", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML holding the executor's execution.config block (broker, backend, ...).")
@click.option("-q", "--queue", "queues", multiple=True,
              help=f"Queue to consume; repeat for several (default: {DEFAULT_QUEUE}).")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Steps this worker runs at once.")
@click.option("-i", "--include", "includes", multiple=True, help="Module to import at start.")
@click.option("-l", "--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def start(
    name: str | None,
    config_yaml: str | None,
    queues: tuple[str, ...],
    concurrency: int,
    includes: tuple[str, ...],
    loglevel: str,
) -> None:
    from dagster_taskiq.broker import BrokerUnavailable
    from dagster_taskiq.worker import WorkerOptions, run_worker

    logging.basicConfig(
        level=loglevel.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings, yaml_includes = settings_from_yaml(config_yaml)
    if settings.task_always_eager:
        raise click.ClickException("task_always_eager runs steps in-process: no worker needed.")
    options = WorkerOptions(
        settings=settings,
        queues=list(queues) or [DEFAULT_QUEUE],
        concurrency=concurrency,
        includes=[*yaml_includes, *includes],
    )
    if name:
        options.name = name
    try:
        asyncio.run(run_worker(options))
    except BrokerUnavailable as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
