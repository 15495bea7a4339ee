"""Artifacts in S3 (any S3-compatible endpoint), configured by environment as in the template:
``S3_ENDPOINT_URL``, ``S3_BUCKET``, ``AWS_DEFAULT_REGION`` and the keys in
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (read by boto3). The harness sets them for the
orchestrator and every worker.
"""

from __future__ import annotations

import os

import dagster as dg
from dagster_aws.s3 import S3PickleIOManager

from dagster_taskiq.s3 import S3Resource, prebuild

DEFAULT_BUCKET = "bench-artifacts"
S3_PREFIX = "dagster"


def s3_resource() -> S3Resource:
    endpoint = dg.EnvVar("S3_ENDPOINT_URL") if os.environ.get("S3_ENDPOINT_URL") else None
    return S3Resource(endpoint_url=endpoint,
                      region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


prebuild(s3_resource())  # as the template: a worker's zygote builds its client once


def s3_io_manager() -> S3PickleIOManager:
    """Step outputs as pickles under s3://<bucket>/dagster/, readable by every worker."""
    return S3PickleIOManager(s3_resource=s3_resource(),
                             s3_bucket=os.environ.get("S3_BUCKET") or DEFAULT_BUCKET,
                             s3_prefix=S3_PREFIX)
