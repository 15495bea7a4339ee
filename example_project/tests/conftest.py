"""Test fixtures: a real S3 endpoint, and a Dagster instance on disk for the taskiq executor.

The S3 endpoint is, in order: the one named by TEST_S3_ENDPOINT_URL (for example your compose
stack's), a ``minio`` or ``weed`` (SeaweedFS) binary on PATH, else moto's server in-process.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from my_dagster_project.storage import ensure_bucket, s3_client

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_binary(directory: Path, port: int) -> subprocess.Popen | None:
    """MinIO or SeaweedFS on 127.0.0.1:port when one is installed, else None."""
    if shutil.which("minio"):
        env = {**os.environ, "MINIO_ROOT_USER": ACCESS_KEY, "MINIO_ROOT_PASSWORD": SECRET_KEY}
        args = ["minio", "server", str(directory), "--address", f"127.0.0.1:{port}",
                "--console-address", f"127.0.0.1:{_free_port()}"]
    elif shutil.which("weed"):
        # SeaweedFS takes its admin identity from these variables.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        args = ["weed", "mini", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.port={port}", f"-master.port={_free_port()}",
                f"-volume.port={_free_port()}", f"-filer.port={_free_port()}",
                "-admin.ui=false", "-webdav=false"]
    else:
        return None
    log = (directory / "s3.log").open("wb")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a running S3-compatible server; the environment points boto3 at it."""
    url = os.environ.get("TEST_S3_ENDPOINT_URL")
    process = None
    moto = None
    if url:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    else:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        process = _start_binary(tmp_path_factory.mktemp("s3"), port)
        if process is None:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            moto.start()
        os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
        os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    os.environ["S3_ENDPOINT_URL"] = url
    os.environ.setdefault("AWS_REGION", "us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            s3_client().list_buckets()
            break
        except Exception:
            if process is not None and process.poll() is not None:
                raise RuntimeError("The S3 server exited at start-up.") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield url
    if moto is not None:
        moto.stop()
    if process is not None:
        process.terminate()
        process.wait(30)


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket for one test, set as S3_BUCKET (what the IO manager writes to)."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    ensure_bucket(s3_client(), name)
    monkeypatch.setenv("S3_BUCKET", name)
    return name


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A throwaway on-disk instance: the taskiq executor refuses an ephemeral one."""
    with dg.instance_for_test() as instance:
        yield instance
