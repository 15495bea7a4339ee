"""The bucket set-up that compose's s3-init service runs, against a real S3 endpoint."""

import uuid

import pytest

from my_dagster_project import storage


def test_ensure_bucket_is_idempotent(s3_endpoint: str) -> None:
    client = storage.s3_client()
    name = f"test-{uuid.uuid4().hex[:16]}"
    assert storage.ensure_bucket(client, name) is True
    assert storage.ensure_bucket(client, name) is False
    assert name in {b["Name"] for b in client.list_buckets()["Buckets"]}


def test_main_creates_the_configured_bucket(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"test-{uuid.uuid4().hex[:16]}"
    monkeypatch.setenv("S3_BUCKET", name)
    assert storage.main(timeout=10) == 0
    assert storage.main(timeout=10) == 0
    out = capsys.readouterr().out
    assert f"Bucket '{name}' created." in out
    assert f"Bucket '{name}' already exists." in out


def test_default_bucket_is_the_answered_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("S3_BUCKET", raising=False)
    assert storage.bucket_name() == "dagster-artifacts"
