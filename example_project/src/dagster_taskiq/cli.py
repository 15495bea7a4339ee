"""The ``dagster-taskiq`` command: start workers, list them, stop them, look at the queues.

Taskiq has no control plane, so everything but ``worker start`` reads or writes the worker
registry and the queues in Redis (see ``registry.py`` and ``broker.py``).

Exit codes: 0 success; 1 no (matching) live worker, or a worker that failed to start; 2 usage
or configuration error; 3 broker unreachable or failing; 4 ``terminate --wait`` timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click
import redis.asyncio as aioredis
import yaml
from redis.exceptions import RedisError

from dagster_taskiq.config import DEFAULT_QUEUE, BrokerSettings, mask_url

T = TypeVar("T")

READY_TIMEOUT = 30.0  # how long `worker start -d` waits for the worker to register
LOG_TAIL_LINES = 20

EXIT_NO_WORKER = 1
EXIT_CONFIG = 2
EXIT_BROKER = 3
EXIT_WAIT_TIMEOUT = 4

# user:password@ in any URL-looking text; a last line of defence for messages we did not write.
_PASSWORD_IN_URL = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")


def scrub(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _PASSWORD_IN_URL.sub(r"\1***@", text)


class CliError(click.ClickException):
    """A one-line error with an exit code of our choosing (never a traceback)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(scrub(message))
        self.exit_code = exit_code


def broker_error(settings: BrokerSettings, exc: BaseException) -> CliError:
    from dagster_taskiq.broker import BrokerUnavailable

    if isinstance(exc, BrokerUnavailable):  # already names the (masked) URL
        return CliError(str(exc), EXIT_BROKER)
    return CliError(
        f"Broker error at {mask_url(settings.broker_url)}: {type(exc).__name__}: {exc}",
        EXIT_BROKER,
    )


# -- configuration ----------------------------------------------------------------------------

# Keys that only make sense inside the executor's config block: at the top level of a file,
# they are a misplaced block (which would otherwise be ignored, and the default broker used).
_EXECUTOR_KEYS = ("broker", "backend", "include", "config_source", "default_queue", "retries")


def _keys(block: object) -> str:
    """``{broker, config_source}``: a block's shape without its values (which may hold
    passwords)."""
    return "{" + ", ".join(map(str, block)) + "}" if isinstance(block, dict) and block else "{}"


def _celery_layout_error(path: str, celery: object) -> CliError:
    """dagster-celery's legacy ``execution: celery:`` block: say what it is and how to rewrite
    it, rather than guess (a guess that goes wrong starts a worker on another broker)."""
    if isinstance(celery, dict) and "config" in celery:
        inner = celery["config"]
        found = f"execution: celery: config: {_keys(inner)}"
        how = "remove the `celery:` level"
    else:
        inner = celery
        found = f"execution: celery: {_keys(inner)}"
        how = "rename `celery:` to `config:`"
    return CliError(
        f"{path}: this is dagster-celery's legacy layout ({found}). dagster-taskiq reads "
        f"execution: config: ...; write execution: config: {_keys(inner)} with the same keys "
        f"({how}). broker must be a redis:// URL; see README, Migrating from dagster-celery.",
        EXIT_CONFIG,
    )


def executor_config_from_yaml(path: str | None) -> dict[str, Any]:
    """The executor config block of a run-config YAML: ``execution.config`` (the layout
    dagster-celery's worker CLI reads too), or our legacy ``execution.taskiq.config``; empty
    when no file is given. dagster-celery's older ``execution.celery`` block, a block at the
    top level or other keys under ``execution`` are refused with how to rewrite them."""
    if not path:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"Cannot read {path}: {exc}", EXIT_CONFIG) from None
    if not isinstance(loaded, dict):
        raise CliError(f"{path} does not hold a YAML mapping.", EXIT_CONFIG)
    misplaced = [key for key in _EXECUTOR_KEYS if key in loaded]
    if misplaced:
        shape = "{" + ", ".join(misplaced) + "}"
        raise CliError(
            f"{path}: {', '.join(misplaced)} at the top level: the executor config goes under "
            f"execution: config:; write execution: config: {shape}.", EXIT_CONFIG)
    execution = loaded.get("execution") or {}
    if not isinstance(execution, dict):
        raise CliError(f"{path}: execution must be a mapping.", EXIT_CONFIG)
    if "celery" in execution:
        raise _celery_layout_error(path, execution["celery"])
    other = sorted(set(map(str, execution)) - {"config", "taskiq"})
    if other:
        raise CliError(f"{path}: unexpected key(s) under execution: {other}; the executor "
                       "config goes under execution: config:.", EXIT_CONFIG)
    if "config" in execution and "taskiq" in execution:
        raise CliError(f"{path}: both execution: config: and execution: taskiq: config:; "
                       "keep one (execution: config:).", EXIT_CONFIG)
    if "taskiq" in execution:
        legacy = execution["taskiq"] or {}
        if not isinstance(legacy, dict) or not set(legacy) <= {"config"}:
            raise CliError(f"{path}: execution: taskiq: {_keys(legacy)} is not a layout we "
                           f"read; write execution: config: {_keys(legacy)}.", EXIT_CONFIG)
        config = legacy.get("config") or {}
    else:
        config = execution.get("config") or {}
    if not isinstance(config, dict):
        raise CliError(f"{path}: execution.config must be a mapping.", EXIT_CONFIG)
    return config


def _config_error_text(message: str) -> str:
    # Dagster appends a stack trace to post-processing errors (e.g. an unset {env: VAR}).
    message = message.split("\n\nStack Trace:")[0]
    return message.rsplit("PostProcessingError: ", 1)[-1].strip()


def validated_config(path: str | None) -> dict[str, Any]:
    """The YAML's executor config, checked against the executor's own schema (so a typo is an
    error, not a silently ignored key) with ``{env: VAR}`` values resolved. Without a YAML the
    settings come from the environment: nothing to check, and Dagster is not imported."""
    if not path:
        return {}
    from dagster._config import process_config

    from dagster_taskiq.executor import taskiq_executor

    raw = executor_config_from_yaml(path)
    config_schema = taskiq_executor.config_schema
    assert config_schema is not None
    result = process_config(config_schema.config_type, raw)
    if not result.success:
        errors = "; ".join(_config_error_text(e.message) for e in result.errors or [])
        raise CliError(f"{path}: invalid executor config: {errors}", EXIT_CONFIG)
    return dict(result.value or {})


def settings_from_yaml(path: str | None) -> tuple[BrokerSettings, list[str]]:
    """Broker settings and modules to include, from ``-y`` (else the environment)."""
    config = validated_config(path)
    try:
        settings = BrokerSettings.from_config(
            config.get("broker"), config.get("backend"), config.get("config_source")
        )
    except (TypeError, ValueError) as exc:  # a config_source value of the wrong kind
        raise CliError(f"{path}: config_source: {exc}", EXIT_CONFIG) from None
    except Exception as exc:
        from dagster import DagsterInvalidConfigError

        if isinstance(exc, DagsterInvalidConfigError):
            raise CliError(f"{path or 'configuration'}: {exc}", EXIT_CONFIG) from None
        raise
    return settings, list(config.get("include") or [])


def redis_settings(path: str | None) -> BrokerSettings:
    settings, _ = settings_from_yaml(path)
    if settings.task_always_eager:
        raise CliError("task_always_eager runs steps in-process: there are no workers or "
                       "queues to inspect.", EXIT_CONFIG)
    return settings


# -- talking to Redis -------------------------------------------------------------------------

def with_redis(settings: BrokerSettings,
               work: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Connect (within ``connect_timeout``), run ``work``, disconnect. Any broker failure
    becomes a one-line error with the URL masked and exit code 3."""
    from dagster_taskiq.broker import REDIS_ERRORS, BrokerUnavailable, RedisLeaseBroker

    async def session() -> T:
        broker = RedisLeaseBroker(settings)
        try:
            await broker.ping()
            return await work(broker.redis)
        finally:
            try:
                await broker.shutdown()
            except (*REDIS_ERRORS, RedisError):
                pass  # nothing to close on a server that is gone

    try:
        return asyncio.run(session())
    except (BrokerUnavailable, *REDIS_ERRORS, RedisError) as exc:
        raise broker_error(settings, exc) from None


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces (the last column is not padded)."""
    cells = [[str(c) for c in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1]
        if len(row) > 1 else row[0]
        for row in cells
    )


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))  # insertion order: priorities highest first


def _age(seconds: float) -> str:
    return f"{seconds:.1f}s"


# -- commands ---------------------------------------------------------------------------------

CONFIG_YAML = click.option(
    "-y", "--config-yaml", type=click.Path(exists=True, dir_okay=False), default=None,
    help="Run-config YAML whose execution.config block (the executor's config) names the "
    "broker. Default: $DAGSTER_TASKIQ_BROKER_URL, else redis://localhost:6379/0.",
)


@click.group(help="Run and inspect dagster-taskiq workers (start, list, terminate) and queues "
             "(status, status --watch); serve the cluster's Prometheus metrics (exporter). "
             "Exit codes: 0 ok; 1 no (matching) live worker, or a worker failed to "
             "start; 2 usage or config error; 3 broker unreachable (URL shown, password "
             "masked); 4 terminate --wait ran out.")
def main() -> None:
    pass


@main.group(help="Start, list and terminate workers.")
def worker() -> None:
    pass


@worker.command(name="start", help="Start a dagster taskiq worker (in the foreground unless -d).")
@click.option("-n", "--name", default=None, help="Worker name (default: dagster-<random>).")
@CONFIG_YAML
@click.option("-q", "--queue", "queues", multiple=True,
              help=f"Queue to consume; repeat for several (default: {DEFAULT_QUEUE}).")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Steps this worker runs at once (runs have as many slots again).")
@click.option("-d", "--background", is_flag=True,
              help="Detach: start the worker in its own session, wait until it has registered, "
              "print its name, pid and log file, and exit.")
@click.option("--logfile", type=click.Path(dir_okay=False), default=None,
              help="With -d: where the worker's output goes (appended). "
              "Default: $TMPDIR/dagster-taskiq-<name>.log.")
@click.option("-i", "--include", "includes", multiple=True, help="Module to import at start.")
@click.option("-l", "--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0,
              show_default=True,
              help="On SIGTERM or `worker terminate`: seconds to let running tasks finish "
              "before handing them back to their queues.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve this worker's Prometheus metrics on this port (/metrics). "
              "Default: off.")
@click.option("--metrics-host", default="0.0.0.0", show_default=True,
              help="With --metrics-port: the address to serve them on.")
@click.option("--max-steps-per-child", type=click.IntRange(min=1), default=None,
              help="Steps of one run that one forked child may run one after another (its "
              "pages and connections are paid for once); 1: a fresh fork for every step. "
              "Default: 50.")
def start(
    name: str | None,
    config_yaml: str | None,
    queues: tuple[str, ...],
    concurrency: int,
    background: bool,
    logfile: str | None,
    includes: tuple[str, ...],
    loglevel: str,
    shutdown_timeout: float,
    metrics_port: int | None,
    metrics_host: str,
    max_steps_per_child: int | None,
) -> None:
    from dagster_taskiq.worker import WorkerOptions

    if logfile and not background:
        raise click.UsageError("--logfile only applies with -d/--background.")
    settings, yaml_includes = settings_from_yaml(config_yaml)
    if settings.task_always_eager:
        raise CliError("task_always_eager runs steps in-process: no worker needed.", EXIT_CONFIG)
    options = WorkerOptions(
        settings=settings,
        queues=list(dict.fromkeys(queues)) or [DEFAULT_QUEUE],
        concurrency=concurrency,
        includes=[*yaml_includes, *includes],
        shutdown_timeout=shutdown_timeout,
        loglevel=loglevel.upper(),
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    if max_steps_per_child is not None:
        options.max_steps_per_child = max_steps_per_child
    if name:
        options.name = name
    if background:
        _start_detached(options, config_yaml, includes, loglevel, logfile)
    else:
        _run_foreground(options, loglevel)


def _run_foreground(options: Any, loglevel: str) -> None:
    from dagster_taskiq.broker import BrokerUnavailable
    from dagster_taskiq.worker import WorkerCrashed, run_worker

    logging.basicConfig(
        level=loglevel.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(run_worker(options))
    except BrokerUnavailable as exc:
        raise broker_error(options.settings, exc) from None
    except WorkerCrashed as exc:
        raise CliError(str(exc), EXIT_NO_WORKER) from None


def _start_detached(options: Any, config_yaml: str | None, includes: Sequence[str],
                    loglevel: str, logfile: str | None) -> None:
    from dagster_taskiq.registry import live_workers

    settings: BrokerSettings = options.settings
    with_redis(settings, lambda redis: redis.ping())  # fail here (exit 3), not in a log file
    log = Path(logfile or Path(tempfile.gettempdir()) / f"dagster-taskiq-{options.name}.log")
    log = log.resolve()
    log.parent.mkdir(parents=True, exist_ok=True)
    # The same command without -d. The broker URL travels in the environment or the YAML,
    # never on the command line (where `ps` would show its password).
    args = [sys.executable, "-m", "dagster_taskiq.cli", "worker", "start",
            "-n", options.name, "-c", str(options.concurrency), "-l", loglevel,
            "--shutdown-timeout", str(options.shutdown_timeout),
            "--max-steps-per-child", str(options.max_steps_per_child)]
    for queue in options.queues:
        args += ["-q", queue]
    for module in includes:
        args += ["-i", module]
    if options.metrics_port is not None:
        args += ["--metrics-port", str(options.metrics_port),
                 "--metrics-host", options.metrics_host]
    if config_yaml:
        args += ["-y", str(Path(config_yaml).resolve())]
    with open(log, "ab") as out:
        offset = out.tell()  # show only this start's lines if it fails
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the shell that started it (and its Ctrl-C)
        )
    host = socket.gethostname()

    def tail() -> str:
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-LOG_TAIL_LINES:])

    async def registered(redis: aioredis.Redis) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            workers = await live_workers(redis, settings.key_prefix)
            if any(w.pid == process.pid and w.host == host for w in workers):
                return True
            await asyncio.sleep(0.2)
        return False

    if not with_redis(settings, registered):
        if process.poll() is None:  # alive but not registered: do not leave it behind
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
            why = f"did not register within {READY_TIMEOUT:.0f} s (stopped it)"
        else:
            why = f"exited with code {process.returncode}"
        raise CliError(f"Worker {options.name} {why}. Last lines of {log}:\n{tail()}")
    click.echo(f"Worker {options.name} started in the background: pid {process.pid}, "
               f"log {log}")


@worker.command(name="list", help="List live workers, one line each starting with its name. "
                "Exit code 0 if at least one worker (with --name: that worker) is live, else 1, "
                "so it can serve as a healthcheck: `dagster-taskiq worker list --name NAME`.")
@CONFIG_YAML
@click.option("--name", "names", multiple=True,
              help="Only workers with this name (or id); repeat for several.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of workers).")
def list_workers(config_yaml: str | None, names: tuple[str, ...], as_json: bool) -> None:
    from dagster_taskiq.registry import live_workers

    settings = redis_settings(config_yaml)
    workers = with_redis(settings, lambda redis: live_workers(redis, settings.key_prefix))
    if names:
        workers = [w for w in workers if w.name in names or w.id in names]
    if as_json:
        echo_json([{**asdict(w), "running": len(w.tasks), "heartbeat_age": round(w.age, 3)}
                   for w in workers])
    elif workers:
        click.echo(table(
            ["NAME", "HOST", "PID", "QUEUES", "CONCURRENCY", "RUNNING", "HEARTBEAT", "STATE"],
            [[w.name, w.host, w.pid, ",".join(w.queues), w.concurrency, len(w.tasks),
              f"{_age(w.age)} ago", "stopping" if w.stop_requested else "live"]
             for w in workers],
        ))
    else:
        which = f" named {', '.join(names)}" if names else ""
        click.echo(f"No live workers{which} on {mask_url(settings.broker_url)}.", err=True)
    if not workers:
        sys.exit(EXIT_NO_WORKER)


@worker.command(name="terminate", help="Ask live workers to stop gracefully: they take no new "
                "tasks, let running ones finish (up to their --shutdown-timeout) and hand the "
                "rest back to their queues. Exit code 1 if no such worker is live; 4 if --wait "
                "ran out.")
@click.argument("name", required=False)
@click.option("-a", "--all", "all_workers", is_flag=True, help="Stop every live worker.")
@CONFIG_YAML
@click.option("--wait", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Wait up to SECONDS until the workers have left the registry.")
def terminate(name: str | None, all_workers: bool, config_yaml: str | None,
              wait: float | None) -> None:
    from dagster_taskiq.registry import live_workers, request_stop

    if bool(name) == all_workers:
        raise click.UsageError("Give a worker NAME or --all (not both).")
    settings = redis_settings(config_yaml)
    prefix = settings.key_prefix

    async def stop(redis: aioredis.Redis) -> tuple[list[str], list[str]]:
        targets = [w for w in await live_workers(redis, prefix)
                   if all_workers or name in (w.name, w.id)]
        for target in targets:
            await request_stop(redis, prefix, target.id)
        asked = [f"{w.name} ({w.id})" for w in targets]
        if wait is None or not targets:
            return asked, []
        ids = {w.id for w in targets}
        deadline = time.monotonic() + wait
        while True:
            remaining = [f"{w.name} ({w.id})" for w in await live_workers(redis, prefix)
                         if w.id in ids]
            if not remaining or time.monotonic() >= deadline:
                return asked, remaining
            await asyncio.sleep(0.2)

    asked, remaining = with_redis(settings, stop)
    if not asked:
        which = "No live workers" if all_workers else f"No live worker named {name}"
        raise CliError(f"{which} on {mask_url(settings.broker_url)}.", EXIT_NO_WORKER)
    for worker_name in asked:
        click.echo(f"Asked {worker_name} to stop.")
    if wait is not None:
        if remaining:
            raise CliError(f"Still running after {wait:g} s: {', '.join(remaining)}.",
                           EXIT_WAIT_TIMEOUT)
        click.echo(f"Stopped: {len(asked)} worker(s).")


def _waiting_text(waiting: dict[str, Any]) -> str:
    from dagster_taskiq.queue_state import waiting_text

    return waiting_text({int(p): n for p, n in waiting["by_priority"].items()})


@main.command(help="Per queue: waiting steps and runs by priority (pN:count, highest first), "
              "tasks in flight, and the live workers serving it with their last heartbeat.")
@CONFIG_YAML
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", is_flag=True,
              help="Redraw queues, workers and running tasks every --interval seconds until "
              "Ctrl-C (exit code 0).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="With --watch: seconds between redraws.")
def status(config_yaml: str | None, as_json: bool, watch: bool, interval: float) -> None:
    from dagster_taskiq.queue_state import read_state, status_report

    settings = redis_settings(config_yaml)
    if watch:
        if as_json:
            raise click.UsageError("--watch draws a live view; it does not print JSON.")
        from dagster_taskiq.watch import watch_status

        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends: exit 0
            with_redis(settings, lambda redis: watch_status(redis, settings, interval))
        return

    async def read(redis: aioredis.Redis) -> dict[str, Any]:
        return status_report(await read_state(redis, settings.key_prefix))

    report = with_redis(settings, read)
    report["broker"] = mask_url(settings.broker_url)
    if as_json:
        echo_json(report)
        return
    click.echo(f"Broker {report['broker']}: {report['workers']} live worker(s).")
    if not report["queues"]:
        click.echo("No queues: nothing waiting and no live workers.")
        return
    rows = []
    for q in report["queues"]:
        flight = q["in_flight"]
        workers = ", ".join(f"{w['name']} ({_age(w['heartbeat_age'])} ago)"
                            for w in q["workers"]) or "- (no live worker)"
        rows.append([q["queue"], _waiting_text(q["waiting"]["steps"]),
                     _waiting_text(q["waiting"]["runs"]),
                     flight["steps"] + flight["runs"], workers])
    click.echo(table(["QUEUE", "STEPS WAITING", "RUNS WAITING", "IN FLIGHT", "WORKERS"], rows))


@main.command(help="Serve the cluster's Prometheus metrics (queues, in-flight tasks, live "
              "workers and their slots), read from Redis on each scrape, on "
              "http://HOST:PORT/metrics until SIGTERM or Ctrl-C. Each worker serves its own "
              "with `worker start --metrics-port`. See README, Metrics.")
@CONFIG_YAML
@click.option("--port", type=click.IntRange(1, 65535), default=9808, show_default=True,
              help="Port to serve /metrics on.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to serve on.")
@click.option("-l", "--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def exporter(config_yaml: str | None, port: int, host: str, loglevel: str) -> None:
    from dagster_taskiq.metrics import run_exporter

    settings = redis_settings(config_yaml)
    logging.basicConfig(level=loglevel.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        run_exporter(settings, host, port)
    except OSError as exc:  # the port is taken
        raise CliError(f"Cannot serve metrics on {host}:{port}: {exc}", EXIT_CONFIG) from None


@main.command(help="Run this project's whole stack natively (no Docker): Redis, S3 and its "
              "bucket, one worker per queue, the code server, the Dagster webserver and "
              "daemon. Run it from the project directory. Prints `redis: ...`, `s3: ...` and "
              "`ready: <UI URL>` once everything answers; Ctrl-C stops all of it.")
@click.option("--port", type=click.IntRange(1, 65535), default=3000, show_default=True,
              help="Webserver (UI) port on 127.0.0.1.")
@click.option("--redis-url", default=None,
              help="Use this Redis instead of starting one (password masked in output).")
@click.option("--s3-endpoint", default=None,
              help="Use this S3 endpoint instead of starting one (keys from AWS_ACCESS_KEY_ID/"
              "AWS_SECRET_ACCESS_KEY).")
@click.option("--storage", default="sqlite", show_default=True,
              help="Dagster storage: sqlite (in a temporary DAGSTER_HOME) or a postgresql:// URL.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=2, show_default=True,
              help="Steps each worker runs at once.")
@click.option("--project-dir", type=click.Path(exists=True, file_okay=False), default=".",
              show_default=True, help="The project directory.")
def dev(port: int, redis_url: str | None, s3_endpoint: str | None, storage: str,
        concurrency: int, project_dir: str) -> None:
    from dagster_taskiq.dev import DevOptions
    from dagster_taskiq.dev import main as dev_main

    sys.exit(dev_main(DevOptions(Path(project_dir), port, redis_url, s3_endpoint, storage,
                                 concurrency)))


if __name__ == "__main__":
    main()
