"""dagster-aws's ``S3Resource``, with the first client of each forked step built in the zygote.

A worker forks every step from its zygote, so a step that uses S3 (the S3 pickle IO manager)
builds a boto3 session and client in every step (~15-20 ms of CPU; ``in_process`` builds one per
run). With this resource, and its configuration named by :func:`prebuild` in the code the
worker loads, the zygote builds that client once and every forked step finds its own copy
(fork copies it): ``get_client()`` returns it the first time in a process, and builds a new
client, exactly as dagster-aws does, after that or whenever the copy does not fit.

    from dagster_taskiq.s3 import S3Resource, prebuild

    resource = S3Resource(endpoint_url=dg.EnvVar("S3_ENDPOINT_URL"), region_name="eu-west-1")
    prebuild(resource)   # cheap where it is not a zygote: it is only remembered

What keeps it as safe as a client built in the step:

- Fork safety: building a client opens no connection and starts no thread, and the zygote
  never uses its client (nothing in the zygote calls ``get_client``: a copy is only taken in a
  process forked from it, and taken out of that process's own dict, so no two processes or
  callers share one). Each step opens its own connection on its first request.
- Credentials: only credentials that cannot change while the zygote lives are built in:
  keys in the resource's config, or static keys in the environment (which a process cannot
  have changed under it; a forked step inherits the zygote's). Anything else (a profile,
  a credentials file, SSO, ``credential_process``, assume-role, web identity / IRSA, container
  or instance roles, and keys with an expiry): no client is built in the zygote, and every
  step resolves (and refreshes) its credentials itself, as without this resource. A built
  client is also replaced every :data:`MAX_AGE` seconds.
- A child that serves several steps of one run (``--max-steps-per-child``) hands each of them,
  one after another, the client it took from the zygote (:func:`reissue`), as ``in_process``
  shares one client between a run's steps; the checks below apply to each step.
- Per-run config: a step takes the copy only when its resource's resolved config (endpoint,
  region, keys, retries, everything) equals the one it was built for, and the process
  environment and the AWS config and credentials files are as they were then; otherwise it
  builds its own.
- Nothing of dagster-aws or botocore is patched: this is a subclass with the same config.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable
from typing import Any

from dagster_aws.s3 import S3Resource as _DagsterS3Resource

MAX_AGE = 600.0  # seconds a client built in the zygote is handed out before it is built again

_requested: list[_DagsterS3Resource] = []  # prebuild()'s resources, as given (EnvVars unresolved)
# key -> (monotonic time built, client): filled in a zygote only, taken in its forked children.
_prebuilt: dict[Hashable, tuple[float, Any]] = {}
_unsuitable: set[Hashable] = set()  # configs a zygote must not build for (checked once each)
_taken: dict[Hashable, tuple[float, Any]] = {}  # taken by this process's current step


class S3Resource(_DagsterS3Resource):
    """dagster-aws's ``S3Resource`` (same config, same clients); in a process forked from a
    dagster-taskiq zygote, the first ``get_client()`` returns the client the zygote built
    for this config (see :func:`prebuild` and this module's doc)."""

    def get_client(self) -> Any:
        client = take(self)
        return client if client is not None else super().get_client()


def prebuild(resource: _DagsterS3Resource) -> None:
    """Have a worker's zygote build a client for ``resource``'s config (its ``EnvVar`` fields
    read from the zygote's environment, as a step's are). Only remembered here."""
    if not any(_fields(resource) == _fields(known) for known in _requested):
        _requested.append(resource)


def take(resource: _DagsterS3Resource) -> Any | None:
    """The client built in the zygote for this resource's (resolved) config, once per process;
    ``None`` when there is none, or it is too old, or the environment changed since."""
    if not _prebuilt:
        return None
    key = _key(_fields(resource))
    built = _prebuilt.pop(key, None)
    if built is None or time.monotonic() - built[0] > MAX_AGE:
        return None
    _taken[key] = built
    return built[1]


def reissue() -> None:
    """In a child that serves another step of its run: the clients its last step took from
    the zygote are there for this one too (same checks: config, environment, files, age)."""
    _prebuilt.update(_taken)
    _taken.clear()


def refresh() -> None:
    """In a zygote, before each fork: build (or build again, when older than :data:`MAX_AGE`
    or the environment changed) a client for every :func:`prebuild` config that allows it."""
    now = time.monotonic()
    for requested in _requested:
        try:
            fields = _resolved(requested)
            key = _key(fields)
        except Exception:
            continue  # an unset EnvVar, say: a step resolving it fails (or not) on its own
        if key in _unsuitable:
            continue
        built = _prebuilt.get(key)
        if built is not None and now - built[0] <= MAX_AGE:
            continue
        for stale in [k for k in _prebuilt if k[0] == key[0]]:
            del _prebuilt[stale]  # built for an older environment or files, or too old
        client = _build(fields)
        if client is None:
            _unsuitable.add(key)
        else:
            _prebuilt[key] = (now, client)


def _fields(resource: _DagsterS3Resource) -> tuple[tuple[str, Any], ...]:
    return tuple((name, getattr(resource, name)) for name in _DagsterS3Resource.model_fields)


def _resolved(resource: _DagsterS3Resource) -> tuple[tuple[str, Any], ...]:
    """The config a step's resource will have: EnvVar fields read (as Dagster does per run)."""
    return tuple((name, value.get_value() if hasattr(value, "get_value") else value)
                 for name, value in _fields(resource))


def _file_state(variable: str, default: str) -> tuple[str, int, int, int] | None:
    path = os.path.expanduser(os.environ.get(variable) or default)
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return path, stat.st_ino, stat.st_mtime_ns, stat.st_size


def _key(fields: tuple[tuple[str, Any], ...]) -> Hashable:
    """The config, the whole process environment, and the AWS files' state: a client fits a
    step only if all three are what they were when it was built."""
    return (fields, frozenset(os.environ.items()),
            _file_state("AWS_CONFIG_FILE", "~/.aws/config"),
            _file_state("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))


def _static_credentials_expected(config: dict[str, Any]) -> bool:
    """Whether this config's credentials come, without any lookup that could touch the network,
    from its own keys or the environment's static keys."""
    if config.get("aws_access_key_id") and config.get("aws_secret_access_key"):
        return True
    env = os.environ
    return (not config.get("profile_name") and bool(env.get("AWS_ACCESS_KEY_ID"))
            and bool(env.get("AWS_SECRET_ACCESS_KEY"))
            and not env.get("AWS_CREDENTIAL_EXPIRATION"))  # expiring env keys refresh


def _build(fields: tuple[tuple[str, Any], ...]) -> Any | None:
    """A client for ``fields`` built as dagster-aws builds it, or ``None`` when its
    credentials could change or expire (then every step builds its own, as it would anyway)."""
    config = dict(fields)
    if not _static_credentials_expected(config):
        return None
    try:
        import botocore.credentials
        import botocore.session

        # defaults_mode "auto" asks the instance metadata service (a connection) for the
        # region: leave that to each step.
        mode = botocore.session.Session().get_config_variable("defaults_mode")
        if str(mode).lower() == "auto":
            return None
        client = _DagsterS3Resource(**config).get_client()
        get_credentials = getattr(client, "_get_credentials", None)
        credentials = get_credentials() if callable(get_credentials) else None
    except Exception:
        return None
    # Checked on what botocore actually resolved: plain, non-refreshing keys, from the config
    # or the environment. (``_get_credentials`` is botocore's; if it goes away, nothing is
    # built here.)
    if type(credentials) is not botocore.credentials.Credentials:
        return None
    if getattr(credentials, "method", None) not in ("explicit", "env"):
        return None
    client._dagster_taskiq_zygote = True  # what a step can tell it by (tests, debugging)
    return client
