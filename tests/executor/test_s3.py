"""Artifacts through a real S3 endpoint, written and read by steps on different processes."""

from __future__ import annotations

import uuid

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
