"""How ``dagster-taskiq`` reads a worker's config YAML (the executor's ``execution.config``
block), ported from dagster-celery's test_config: no Redis needed, nothing is started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dagster_taskiq.cli import EXIT_CONFIG, CliError, settings_from_yaml
from dagster_taskiq.config import (
    BROKER_URL_ENV,
    CELERY_CONFIG_SOURCE_KEYS,
    CELERY_TRANSPORT_OPTIONS,
    DEFAULT_BROKER_URL,
    celery_key_advice,
)
from dagster_taskiq.launcher import TaskiqRunLauncher
from tests.executor.conftest import eager_config, execute_test_job

ENV_URL = "redis://envhost:6380/2"


@pytest.fixture(autouse=True)
def broker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BROKER_URL_ENV, ENV_URL)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "worker.yaml"
    path.write_text(text)
    return str(path)


def test_no_yaml_uses_the_environment() -> None:
    settings, includes = settings_from_yaml(None)
    assert (settings.broker_url, settings.backend_url, includes) == (ENV_URL, ENV_URL, [])
    assert settings.key_prefix == "{dagster-taskiq}"


def test_no_yaml_and_no_environment_uses_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BROKER_URL_ENV)
    assert settings_from_yaml(None)[0].broker_url == DEFAULT_BROKER_URL


@pytest.mark.parametrize("text", [
    "",
    "execution: {}\n",
    "execution:\n  config:\n    broker: null\n    backend: null\n    config_source: null\n",
    "execution:\n  taskiq:\n    config: {}\n",
])
def test_empty_and_partial_yaml_fall_back_to_the_environment(tmp_path: Path, text: str) -> None:
    settings, includes = settings_from_yaml(write(tmp_path, text))
    assert (settings.broker_url, settings.backend_url, includes) == (ENV_URL, ENV_URL, [])


def test_full_yaml(tmp_path: Path) -> None:
    settings, includes = settings_from_yaml(write(tmp_path, """
execution:
  config:
    broker: redis://:pw@broker:6379/0
    backend: redis://:pw@broker/0
    include: [my_project.ops]
    default_queue: short
    retries: {enabled: {}}
    config_source: {key_prefix: team-a, connect_timeout: 2.5}
"""))
    assert settings.broker_url == "redis://:pw@broker:6379/0"
    assert settings.backend_url == "redis://:pw@broker/0"  # the same database, written otherwise
    # The prefix comes back wrapped in braces: a Redis Cluster hash tag.
    assert (settings.key_prefix, settings.connect_timeout) == ("{team-a}", 2.5)
    assert includes == ["my_project.ops"]


def test_legacy_shape(tmp_path: Path) -> None:
    """dagster-celery also accepted ``execution: {celery: {config: ...}}``; ours is ``taskiq``."""
    path = write(tmp_path, "execution:\n  taskiq:\n    config:\n      broker: redis://legacy/3\n")
    settings, _ = settings_from_yaml(path)
    assert (settings.broker_url, settings.backend_url) == ("redis://legacy/3", "redis://legacy/3")


def test_env_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_BROKER", "redis://from-env:6379/4")
    monkeypatch.setenv("MY_BACKEND", "redis://from-env:6379/4")
    settings, _ = settings_from_yaml(write(tmp_path, """
execution:
  config:
    broker: {env: MY_BROKER}
    backend: {env: MY_BACKEND}
"""))
    assert settings.broker_url == "redis://from-env:6379/4"
    assert settings.backend_url == "redis://from-env:6379/4"


@pytest.mark.parametrize(("text", "expected"), [
    ("execution: [1, 2\n", "Cannot read"),
    ("- a list\n", "does not hold a YAML mapping"),
    ("execution:\n  config: [broker]\n", "execution.config must be a mapping"),
    ("execution:\n  config:\n    brokr: redis://x\n", 'unexpected config entry "brokr"'),
    ("execution:\n  config:\n    config_source: {no_such_option: 1}\n",
     "Unknown config_source key(s) ['no_such_option']"),
    ("execution:\n  config:\n    broker: {env: CLI_TEST_UNSET_VARIABLE}\n",
     'environment variable "CLI_TEST_UNSET_VARIABLE" which is not set'),
    ("execution:\n  config:\n    config_source: {connect_timeout: soon}\n", "config_source"),
    ("execution:\n  config:\n    broker: amqp://user:hunter2@rabbit//\n",
     "Unsupported broker URL 'amqp://user:***@rabbit//'"),
])
def test_bad_config_is_a_clear_config_error(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(CliError) as raised:
        settings_from_yaml(write(tmp_path, text))
    message = raised.value.format_message()
    assert expected in message
    assert "hunter2" not in message and "Traceback" not in message
    assert raised.value.exit_code == EXIT_CONFIG


@pytest.mark.parametrize("backend", [
    "redis://:pw@broker:6379/1",        # another database of the same server
    "redis://:pw@results:6379/0",       # another server
    "rediss://:pw@broker:6379/0",       # another scheme
])
def test_a_backend_other_than_the_brokers_database_is_refused(tmp_path: Path,
                                                              backend: str) -> None:
    """One reply path: lost and revoked replies are written by the broker's scripts, beside
    the task's state, so results cannot live anywhere else (before, terminate and lost-worker
    recovery hung when `backend` named another database)."""
    with pytest.raises(CliError, match="is not the broker's Redis database") as caught:
        settings_from_yaml(write(tmp_path, f"""
execution:
  config:
    broker: redis://:pw@broker:6379/0
    backend: {backend}
"""))
    assert "pw" not in str(caught.value)
    assert "Drop `backend`" in str(caught.value)


# -- migrating from dagster-celery ------------------------------------------------------------

def config_error(path: str) -> str:
    with pytest.raises(CliError) as raised:
        settings_from_yaml(path)
    assert raised.value.exit_code == EXIT_CONFIG
    return raised.value.format_message()


@pytest.mark.parametrize(("text", "found", "rewrite"), [
    # dagster-celery's pre-1.0 run config (executor named under execution).
    ("execution:\n  celery:\n    config:\n      broker: redis://celery-host:6379/0\n"
     "      include: [my_project.ops]\n      config_source: {task_acks_late: true}\n",
     "execution: celery: config: {broker, include, config_source}",
     "write execution: config: {broker, include, config_source}"),
    # dagster-celery's worker YAML (its Helm chart and example): the keys right under celery.
    ("execution:\n  celery:\n    broker: {env: CELERY_BROKER_URL}\n"
     "    backend: {env: CELERY_RESULT_BACKEND}\n",
     "execution: celery: {broker, backend}", "write execution: config: {broker, backend}"),
    ("execution:\n  celery:\n", "execution: celery: {}", "write execution: config: {}"),
])
def test_dagster_celery_legacy_layout_is_refused_with_the_rewrite(
        tmp_path: Path, text: str, found: str, rewrite: str) -> None:
    """Refused rather than read: guessing wrong would start a worker on the environment's
    broker (what happened before: the block was ignored)."""
    message = config_error(write(tmp_path, text))
    assert "dagster-celery's legacy layout" in message and found in message, message
    assert rewrite in message and "with the same keys" in message, message
    assert "celery-host" not in message  # the shape is shown, never the values
    assert len(message.splitlines()) == 1


def test_dagster_celery_newer_layout_works_unchanged(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """dagster-celery 1.x's worker YAML is ``execution: config:`` with broker, backend, include
    and config_source: the same keys with the same meaning, so it is read as it is (once the
    broker is a Redis URL and config_source holds no Celery settings)."""
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:pw@celery-redis:6379/0")
    settings, includes = settings_from_yaml(write(tmp_path, """
execution:
  config:
    broker: {env: CELERY_BROKER_URL}
    backend: {env: CELERY_BROKER_URL}
    include: [my_project.ops, my_project.assets]
    config_source: {}
"""))
    assert (settings.broker_url, settings.backend_url) == ("redis://:pw@celery-redis:6379/0",) * 2
    assert includes == ["my_project.ops", "my_project.assets"]


@pytest.mark.parametrize(("text", "expected"), [
    # dagster-celery reads only execution.config: top-level keys are a misplaced block.
    ("broker: redis://top:6379/0\nconfig_source: {}\n",
     "broker, config_source at the top level: the executor config goes under execution: "
     "config:; write execution: config: {broker, config_source}."),
    ("execution:\n  multiprocess:\n    config: {}\n",
     "unexpected key(s) under execution: ['multiprocess']"),
    ("execution:\n  taskiq:\n    broker: redis://flat/0\n",
     "execution: taskiq: {broker} is not a layout we read; write execution: config: {broker}"),
    ("execution:\n  config: {}\n  taskiq:\n    config: {}\n", "keep one"),
])
def test_other_misplaced_blocks_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in config_error(write(tmp_path, text))


def test_the_celery_table_covers_what_dagster_celery_users_set() -> None:
    # dagster-celery's own defaults and the settings its docs and users put in config_source.
    for key in ("broker_transport_options", "task_acks_late", "worker_prefetch_multiplier",
                "task_default_queue", "task_default_priority", "result_expires",
                "broker_connection_retry_on_startup", "worker_concurrency", "task_serializer",
                "accept_content", "result_serializer", "broker_pool_limit", "task_routes",
                "visibility_timeout"):
        assert key in CELERY_CONFIG_SOURCE_KEYS, key
    assert "visibility_timeout" in CELERY_TRANSPORT_OPTIONS
    for advice in (*CELERY_CONFIG_SOURCE_KEYS.values(), *CELERY_TRANSPORT_OPTIONS.values()):
        assert "\n" not in advice


def test_the_readme_migration_table_names_every_key() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Migrating from dagster-celery", 1)[1].split("\n### ", 1)[0]
    for key in (*CELERY_CONFIG_SOURCE_KEYS, *CELERY_TRANSPORT_OPTIONS):
        assert f"`{key}`" in section, key


@pytest.mark.parametrize("key", sorted(CELERY_CONFIG_SOURCE_KEYS))
def test_each_celery_setting_is_explained_by_the_cli(tmp_path: Path, key: str) -> None:
    message = config_error(write(tmp_path, f"""
execution:
  config:
    broker: redis://localhost:6379/0
    config_source: {{{key}: 1}}
"""))
    assert f"  {key}: {CELERY_CONFIG_SOURCE_KEYS[key]}\n" in message, message
    assert "Unknown config_source key" not in message  # explained, not merely unknown


def test_transport_options_are_explained_key_by_key(tmp_path: Path) -> None:
    """dagster-celery's own test config (broker_transport_options: visibility_timeout) and
    its defaults (max_retries and the intervals)."""
    message = config_error(write(tmp_path, """
execution:
  config:
    config_source:
      broker_transport_options: {visibility_timeout: 18000, max_retries: 3, region: eu}
      worker_prefetch_multiplier: 1
      no_such_option: 1
"""))
    line = next(x for x in message.splitlines() if "broker_transport_options:" in x)
    assert "drop the block" in line
    assert f"visibility_timeout: {CELERY_TRANSPORT_OPTIONS['visibility_timeout']}" in line
    assert "worker_heartbeat_timeout" in line
    assert f"max_retries: {CELERY_TRANSPORT_OPTIONS['max_retries']}" in line
    assert "region" not in line  # not a key we know: the block is dropped anyway
    assert "  worker_prefetch_multiplier: drop it: workers never prefetch" in message
    # Keys that are neither ours nor Celery's keep the generic error, in the same message.
    assert "Unknown config_source key(s) ['no_such_option']" in message


EXECUTOR_CASES: list[tuple[str, Any]] = [
    ("worker_prefetch_multiplier", 1),
    ("task_acks_late", True),
    ("broker_transport_options", {"visibility_timeout": 18000}),
    ("result_expires", 3600),
]


@pytest.mark.parametrize(("key", "value"), EXECUTOR_CASES)
def test_the_executor_gives_the_same_explanation(instance: Any, io_dir: str, key: str,
                                                 value: Any) -> None:
    """A job's own ``execution: config: config_source`` gets the CLI's line (one table).
    Eager mode: the config is refused before any broker would be needed."""
    config = eager_config(io_dir)
    config["execution"]["config"]["config_source"][key] = value
    expected = celery_key_advice(key, value)
    assert expected
    with pytest.raises(Exception) as raised, \
            execute_test_job("test_job", instance, config, raise_on_error=True):
        pass
    assert expected in str(raised.value), str(raised.value)


def test_the_run_launcher_gives_the_same_explanation() -> None:
    with pytest.raises(Exception) as raised:
        TaskiqRunLauncher(broker="redis://localhost:6379/0",
                          config_source={"worker_concurrency": 8})
    assert celery_key_advice("worker_concurrency") in str(raised.value)
