"""Where artifacts live: an S3 bucket (or any S3-compatible store), configured by environment.

Variables (compose.yaml sets them; see .env.example):
``S3_ENDPOINT_URL`` (empty for AWS), ``S3_BUCKET``, ``AWS_REGION``, and the keys in
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (read by boto3, so never shown in the UI).

``python -m my_dagster_project.storage`` creates the bucket if it is missing (compose's
``s3-init`` service); running it again changes nothing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import dagster as dg
from botocore.exceptions import BotoCoreError, ClientError
from dagster_aws.s3 import S3PickleIOManager

# dagster-aws's S3Resource; on a worker, each step's first client is built once in its zygote
# (only for static keys, as here from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, and only when the
# step's config and environment are the zygote's: see dagster_taskiq/s3.py).
from dagster_taskiq.s3 import S3Resource, prebuild

DEFAULT_BUCKET = "dagster-artifacts"
S3_PREFIX = "dagster"


def bucket_name() -> str:
    return os.environ.get("S3_BUCKET") or DEFAULT_BUCKET


def region_name() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_resource() -> S3Resource:
    """The S3 client resource; the endpoint is read when a run starts, on every worker."""
    # EnvVar only when set: unset means AWS's own endpoint.
    endpoint = dg.EnvVar("S3_ENDPOINT_URL") if os.environ.get("S3_ENDPOINT_URL") else None
    return S3Resource(endpoint_url=endpoint, region_name=region_name())


# Workers build this client once per zygote rather than once per step (only remembered here).
prebuild(s3_resource())


def s3_io_manager() -> S3PickleIOManager:
    """Step outputs and assets as pickles under s3://<bucket>/dagster/: every worker reads them."""
    return S3PickleIOManager(
        s3_resource=s3_resource(), s3_bucket=bucket_name(), s3_prefix=S3_PREFIX
    )


def s3_client() -> Any:
    """A boto3 client configured as the resource is, for use outside a run."""
    endpoint = os.environ.get("S3_ENDPOINT_URL") or None
    return S3Resource(endpoint_url=endpoint, region_name=region_name()).get_client()


def ensure_bucket(client: Any, bucket: str, region: str = "us-east-1") -> bool:
    """Create ``bucket`` unless it exists; True when it was created. Safe to call repeatedly."""
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code"))
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":  # AWS rejects an explicit us-east-1 constraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        # Another process won the race: the bucket exists, which is all we want.
        if exc.response.get("Error", {}).get("Code") not in (
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        ):
            raise
        return False
    return True


def main(timeout: float = 120.0) -> int:
    """Wait for the S3 endpoint (it may still be starting), then ensure the bucket exists."""
    bucket = bucket_name()
    deadline = time.monotonic() + timeout
    while True:
        try:
            created = ensure_bucket(s3_client(), bucket, region_name())
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                print(f"Could not reach S3 to create bucket {bucket!r}: {exc}", file=sys.stderr)
                return 1
            time.sleep(2)
            continue
        print(f"Bucket {bucket!r} {'created' if created else 'already exists'}.")
        return 0


if __name__ == "__main__":
    sys.exit(main())
