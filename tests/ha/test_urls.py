"""The Sentinel and Cluster URL forms: what they name, their errors, and masking."""

from __future__ import annotations

import pytest
from dagster import DagsterInvalidConfigError

from dagster_taskiq.config import (
    BrokerSettings,
    mask_url,
    parse_redis_url,
    same_redis_database,
    validate_redis_url,
)


def test_a_sentinel_url_names_its_sentinels_service_and_database() -> None:
    target = parse_redis_url("redis+sentinel://app:p%40ss@s1:5000,s2,[::1]:5002/mymaster/3"
                             "?sentinel_password=sp&sentinel_username=watch")
    assert target.kind == "sentinel"
    assert target.nodes == (("s1", 5000), ("s2", 26379), ("::1", 5002))
    assert (target.service, target.db) == ("mymaster", 3)
    assert (target.username, target.password) == ("app", "p@ss")
    assert (target.sentinel_username, target.sentinel_password) == ("watch", "sp")
    assert not target.tls
    assert parse_redis_url("rediss+sentinel://s1/m").tls
    assert parse_redis_url("redis+sentinel://s1/m").db == 0
    assert "sp" not in repr(target) and "p@ss" not in repr(target)


def test_a_cluster_url_names_its_nodes() -> None:
    target = parse_redis_url("rediss+cluster://:pw@n1:7000,n2/")
    assert (target.kind, target.nodes, target.password, target.tls) == (
        "cluster", (("n1", 7000), ("n2", 6379)), "pw", True)
    assert parse_redis_url("redis+cluster://n1:7000/0").db == 0


@pytest.mark.parametrize(("url", "reason"), [
    ("redis+sentinel://:secret@s1:26379", "must end with /<service name>"),
    ("redis+sentinel://:secret@s1/m/1/2", "must end with /<service name>"),
    ("redis+sentinel://:secret@s1/m/x", "bad database number 'x'"),
    ("redis+sentinel://:secret@s1/m?ssl=true", r"unknown option\(s\) \['ssl'\]"),
    ("redis+cluster://:secret@n1/2", "Redis Cluster has only database 0"),
    ("redis+cluster://:secret@n1?sentinel_password=x", "unknown option"),
    ("redis+cluster://:secret@", "no host"),
    ("redis+sentinel://:secret@s1:70000/m", "bad port 70000"),
    ("redis+sentinel://:secret@s1:port/m", "bad host 's1:port'"),
    ("amqp://guest:secret@rabbit//", "not a Redis URL"),
])
def test_a_bad_url_is_refused_clearly_without_its_password(url: str, reason: str) -> None:
    with pytest.raises(DagsterInvalidConfigError, match=reason) as caught:
        validate_redis_url(url, "broker")
    assert "secret" not in str(caught.value)
    assert mask_url(url) in str(caught.value)
    assert "redis+sentinel://" in str(caught.value)  # the forms that work are listed


def test_mask_url_masks_every_password() -> None:
    assert mask_url("redis+sentinel://u:pw@s1,s2:1/m/0?sentinel_password=spw&x=1") == \
        "redis+sentinel://u:***@s1,s2:1/m/0?sentinel_password=***&x=1"
    assert mask_url("redis+cluster://:pw@n1:7000,n2:7001") == "redis+cluster://:***@n1:7000,n2:7001"
    assert mask_url("unix:///run/redis.sock?password=pw&db=2") == \
        "unix:///run/redis.sock?password=***&db=2"
    assert mask_url("redis://h:6379/0?ssl_cert_reqs=none") == "redis://h:6379/0?ssl_cert_reqs=none"


def test_the_backend_must_be_the_brokers_database_in_every_form() -> None:
    sentinel = "redis+sentinel://:a@s1,s2/m/1"
    assert same_redis_database(sentinel, "redis+sentinel://:b@s2:26379,s1/m/1?sentinel_password=x")
    assert not same_redis_database(sentinel, "redis+sentinel://:a@s1,s2/m/2")
    assert not same_redis_database(sentinel, "redis+sentinel://:a@s1,s2/other/1")
    assert not same_redis_database("redis+cluster://n1", "redis://n1:6379/0")
    with pytest.raises(DagsterInvalidConfigError, match="not the broker's Redis database"):
        BrokerSettings.from_config(sentinel, "redis+sentinel://:a@s1,s2/m/2")
    assert BrokerSettings.from_config(sentinel).backend_url == sentinel
