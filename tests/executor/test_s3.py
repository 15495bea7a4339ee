"""Artifacts through a real S3 endpoint, written and read by steps on different processes."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid

import dagster as dg
import pytest

from tests.executor.conftest import execute_test_job


def test_s3_io_manager_on_workers(start_worker, instance, broker_url, s3_endpoint, monkeypatch):
    bucket = f"taskiq-{uuid.uuid4().hex[:8]}"
    s3_endpoint.client().create_bucket(Bucket=bucket)
    for name, value in {**s3_endpoint.env(), "S3_BUCKET": bucket}.items():
        monkeypatch.setenv(name, value)
    start_worker(concurrency=2)
    config = {"execution": {"config": {"broker": broker_url}}}
    with execute_test_job("s3_job", instance, config) as result:
        assert result.success
        assert result.output_for_node("subtract") == -1
        run_id = result.run_id
    prefix = f"taskiq-tests/storage/{run_id}"
    listed = s3_endpoint.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    keys = sorted(obj["Key"].rsplit("/", 2)[-2] + "/" + obj["Key"].rsplit("/", 1)[-1]
                  for obj in listed.get("Contents", []))
    assert keys == [
        "add_one/result",
        "emit_values/value_one",
        "emit_values/value_two",
        "renamed/result",
        "subtract/result",
    ]


# -- dagster_taskiq.s3: each step's first client built once, in the zygote ---------------------


def _s3_env(s3_endpoint, monkeypatch) -> str:
    bucket = f"taskiq-{uuid.uuid4().hex[:8]}"
    s3_endpoint.client().create_bucket(Bucket=bucket)
    for name, value in {**s3_endpoint.env(), "S3_BUCKET": bucket}.items():
        monkeypatch.setenv(name, value)
    return bucket


@pytest.mark.parametrize("per_child", ["1", "50"])
def test_prebuilt_s3_client_on_workers_respects_run_config(
        start_worker, instance, broker_url, s3_endpoint, monkeypatch, per_child):
    """A real worker: the zygote builds the client, each step takes its own copy, requests and
    the IO manager work with it; a run whose resource config differs (endpoint, region) gets
    a client built for that config. A child that serves the run's next step hands it the
    same copy again."""
    _s3_env(s3_endpoint, monkeypatch)
    start_worker(concurrency=2, args=["--max-steps-per-child", per_child])
    config: dict = {"execution": {"config": {"broker": broker_url}}}
    with execute_test_job("s3_prebuilt_job", instance, config) as result:
        assert result.success
        report = result.output_for_node("s3_client_downstream")
    assert report["first"] == {"zygote": True, "endpoint": s3_endpoint.url,
                               "region": "us-east-1"}
    # The next step read the first one's output with the zygote's client: its own copy in
    # another process, or the same one again in the same child.
    assert report["loader"]["zygote"] is True
    if per_child == "1":
        assert report["loader_pid"] != report["pid"]
    else:
        assert report["loader_pid"] == report["pid"]

    other_endpoint = s3_endpoint.url.replace("127.0.0.1", "localhost")
    config["resources"] = {"s3": {"config": {"endpoint_url": other_endpoint,
                                             "region_name": "eu-west-1"}}}
    with execute_test_job("s3_prebuilt_job", instance, config) as result:
        assert result.success
        report = result.output_for_node("s3_client_downstream")
    assert report["first"] == {"zygote": False, "endpoint": other_endpoint,
                               "region": "eu-west-1"}
    assert report["loader"]["zygote"] is True  # the IO manager's own resource: unchanged


def test_prebuilt_s3_client_not_for_expiring_credentials(
        start_worker, instance, broker_url, s3_endpoint, monkeypatch):
    """Keys with an expiry (botocore refreshes them) are never built into a zygote's client:
    every step resolves its own, as without dagster_taskiq.s3."""
    _s3_env(s3_endpoint, monkeypatch)
    monkeypatch.setenv("AWS_CREDENTIAL_EXPIRATION", "2999-01-01T00:00:00Z")
    start_worker()
    config = {"execution": {"config": {"broker": broker_url}}}
    with execute_test_job("s3_prebuilt_job", instance, config) as result:
        assert result.success
        report = result.output_for_node("s3_client_downstream")
    assert report["first"]["zygote"] is False
    assert report["loader"]["zygote"] is False


@pytest.fixture
def s3_module(monkeypatch):
    """dagster_taskiq.s3 with empty state (this test process plays the zygote)."""
    from dagster_taskiq import s3

    monkeypatch.setattr(s3, "_requested", [])
    monkeypatch.setattr(s3, "_prebuilt", {})
    monkeypatch.setattr(s3, "_unsuitable", set())
    return s3


def _sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_prebuilt_s3_client_is_fork_safe(s3_module, s3_endpoint, monkeypatch):
    """Building opens no socket and starts no thread; every forked child gets its own unused
    copy (the parent's is never used, so the next child's is too) and opens its own
    connection."""
    bucket = _s3_env(s3_endpoint, monkeypatch)
    resource = s3_module.S3Resource(endpoint_url=s3_endpoint.url, region_name="us-east-1")
    s3_module.prebuild(resource)
    threads, sockets = threading.active_count(), _sockets()
    s3_module.refresh()
    assert len(s3_module._prebuilt) == 1
    assert (threading.active_count(), _sockets()) == (threads, sockets)
    for child in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            code = 1
            try:
                client = resource.get_client()
                client.put_object(Bucket=bucket, Key=f"child{child}", Body=b"x")
                again = resource.get_client()
                os.write(write, json.dumps([client._dagster_taskiq_zygote,
                                            hasattr(again, "_dagster_taskiq_zygote")]).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as reply:
            assert json.loads(reply.read()) == [True, False]
        assert os.waitpid(pid, 0)[1] == 0
    assert len(s3_module._prebuilt) == 1  # still here, unused
    assert _sockets() == sockets


def test_prebuilt_s3_client_only_for_static_credentials(s3_module, s3_endpoint, monkeypatch,
                                                        tmp_path):
    """Built for keys in the config or static keys in the environment; never for credentials
    that come from a profile or file, or expire (those a step resolves and refreshes itself)."""
    _s3_env(s3_endpoint, monkeypatch)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = a\naws_secret_access_key = b\n"
                           "[other]\naws_access_key_id = c\naws_secret_access_key = d\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))

    def built(**config) -> bool:
        s3_module._requested.clear()
        s3_module._prebuilt.clear()
        s3_module._unsuitable.clear()
        s3_module.prebuild(s3_module.S3Resource(endpoint_url=s3_endpoint.url, **config))
        s3_module.refresh()
        return bool(s3_module._prebuilt)

    assert built()  # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    assert not built(profile_name="other")
    monkeypatch.setenv("AWS_CREDENTIAL_EXPIRATION", "2999-01-01T00:00:00Z")
    assert not built()
    monkeypatch.delenv("AWS_CREDENTIAL_EXPIRATION")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert not built()  # the credentials file's: it can change under a long-lived zygote
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/r")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "token"))
    assert not built()  # IRSA
    assert built(aws_access_key_id="k", aws_secret_access_key="s")


def test_prebuilt_s3_client_taken_only_when_it_fits(s3_module, s3_endpoint, monkeypatch):
    """A step takes the client only for the same resolved config, environment and AWS files,
    once per process, and not past MAX_AGE (the zygote then builds it again)."""
    _s3_env(s3_endpoint, monkeypatch)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("BENCH_ENDPOINT", s3_endpoint.url)
    s3_module.prebuild(s3_module.S3Resource(endpoint_url=dg.EnvVar("BENCH_ENDPOINT"),
                                            region_name="us-east-1"))
    s3_module.refresh()
    step = s3_module.S3Resource(endpoint_url=s3_endpoint.url, region_name="us-east-1")
    assert s3_module.take(step.model_copy(update={"region_name": "eu-west-1"})) is None
    assert s3_module.take(step.model_copy(update={"max_attempts": 2})) is None
    monkeypatch.setenv("SOMETHING_ELSE", "1")
    assert s3_module.take(step) is None  # another environment
    monkeypatch.delenv("SOMETHING_ELSE")
    client = s3_module.take(step)
    assert client is not None and client.meta.region_name == "us-east-1"
    assert s3_module.take(step) is None  # once per process
    s3_module.refresh()
    (key, (built, client)), = s3_module._prebuilt.items()
    s3_module._prebuilt[key] = (built - s3_module.MAX_AGE - 1, client)
    assert s3_module.take(step) is None  # too old
    s3_module._prebuilt[key] = (built - s3_module.MAX_AGE - 1, client)
    s3_module.refresh()
    assert s3_module._prebuilt[key][1] is not client  # built again
