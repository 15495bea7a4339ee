"""Redis over TLS (``rediss://``) and with an ACL user: workers and runs work, and no
password shows up in the worker's log or the run's events."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port, start_redis, wait_for
from tests.executor.conftest import execute_test_job, run_config


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_redis(tmp_path):
    cert, key = _self_signed(tmp_path)
    port = free_port()
    password = "tls-secret-pw"
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
         str(cert), "--tls-auth-clients", "no", "--requirepass", password, "--save", "",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"

    def answers() -> bool:
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.RedisError:
            return False

    wait_for(answers, 10, "redis over TLS")
    yield url, password
    process.terminate()
    process.wait(10)


def test_tls_redis(start_worker, instance, io_dir, tls_redis):
    url, password = tls_redis
    worker = start_worker(broker=url)
    with execute_test_job("test_serial_job", instance, run_config(io_dir, url)) as result:
        assert result.success
        events = "\n".join(str(record) for record in instance.all_logs(result.run_id))
    assert password not in worker.output() and password not in events
    assert "rediss://:***@127.0.0.1" in worker.output()


def test_acl_user_and_password(start_worker, instance, io_dir, tmp_path):
    server = start_redis(tmp_path)
    try:
        server.client().execute_command(
            "ACL", "SETUSER", "dagster", "on", ">acl-secret-pw", "~*", "&*", "+@all"
        )
        url = f"redis://dagster:acl-secret-pw@127.0.0.1:{server.port}/0"
        worker = start_worker(broker=url)
        with execute_test_job("test_job", instance, run_config(io_dir, url)) as result:
            assert result.success
        assert "acl-secret-pw" not in worker.output()
        assert "redis://dagster:***@127.0.0.1" in worker.output()
    finally:
        server.process.terminate()
        server.process.wait(10)
