"""How ``dagster-taskiq`` reads a worker's config YAML (the executor's ``execution.config``
block), ported from dagster-celery's test_config: no Redis needed, nothing is started."""

from __future__ import annotations

from pathlib import Path

import pytest

from dagster_taskiq.cli import EXIT_CONFIG, CliError, settings_from_yaml
from dagster_taskiq.config import BROKER_URL_ENV, DEFAULT_BROKER_URL

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
