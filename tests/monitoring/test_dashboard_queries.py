"""Every dashboard panel's and every alert rule's query, evaluated by a real Prometheus that
scrapes a live native stack: a private redis-server, two workers with ``--metrics-port``, the
``dagster-taskiq exporter``, and runs launched through ``TaskiqRunLauncher`` onto the workers.

The scenario: a run whose steps span two queues and three priorities, a slow step, a step that
fails once then succeeds on retry, and a step whose process dies. Every panel must then draw
data with the labels its legend names (no panel ships "No data"). Then the failures: the side
queue's worker stops while a run waits on that queue, Redis stops, the exporter stops; the
alerts for them must fire. Each panel's title, query and result summary is written to
``$DAGSTER_TASKIQ_DASHBOARD_RESULTS`` (default ``bench/results/tmp/dashboard-queries.json``).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.definitions.reconstruct import ReconstructableJob

from dagster_taskiq.tags import TASKIQ_QUEUE_TAG
from tests.conftest import RedisServer, free_port, start_redis, wait_for
from tests.executor.conftest import CLI, worker_env
from tests.monitoring.conftest import (
    ALERTS,
    DASHBOARD,
    REPO,
    Prometheus,
    local_config,
    rules_firing_at_once,
    wait_stopped,
)

JOBS_FILE = str(Path(__file__).with_name("jobs.py"))
# KEDA's query for each queue's worker pool, as the template ships it (Kubernetes target).
AUTOSCALING = next((REPO / "template").glob("*/kubernetes/autoscaling.yaml.jinja"))
QUEUES = ("dagster", "side")
# What Grafana would send: "All" of a multi-value variable as a regex of the values, and a rate
# window that spans several 1 s scrapes.
VARIABLES = {"$__rate_interval": "15s", "$queue": "(" + "|".join(QUEUES) + ")"}
# Alerts the scenario makes fire; the others are checked on their signal (the expression
# without its threshold), since their thresholds take minutes of real trouble to cross.
FIRED = {"DagsterTaskiqQueueWithoutWorkers", "DagsterTaskiqLostSteps", "DagsterTaskiqWorkerDown",
         "DagsterTaskiqRedisUnreachable", "DagsterTaskiqExporterDown"}
THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.e+-]+\s*$")


def _results_path() -> Path:
    default = REPO / "bench" / "results" / "tmp" / "dashboard-queries.json"
    return Path(os.environ.get("DAGSTER_TASKIQ_DASHBOARD_RESULTS", default))


def _substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown dashboard variable in {expr}"
    return expr


def _legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def _alert_labels(rule: dict[str, Any]) -> set[str]:
    text = " ".join(rule["annotations"].values())
    return set(re.findall(r"\$labels\.(\w+)", text))


def _finite(values: list[list[Any]]) -> list[float]:
    return [float(v) for _, v in values if math.isfinite(float(v))]


def _summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    series = []
    for s in result["result"]:
        values = _finite(s["values"]) if "values" in s else _finite([s["value"]])
        series.append({"labels": s["metric"], "points": len(values),
                       "last": values[-1] if values else None,
                       "max": max(values) if values else None})
    return series


def _launch(instance: DagsterInstance, job_name: str, tags: dict[str, str] | None = None) -> str:
    recon = ReconstructableJob.for_file(JOBS_FILE, job_name)
    run = instance.create_run_for_job(job_def=recon.get_definition(), run_config={}, tags=tags,
                                      job_code_origin=recon.get_python_origin())
    instance.launch_run(run.run_id, workspace=None)  # our launcher needs no workspace
    return run.run_id


def _finished(instance: DagsterInstance, run_id: str) -> DagsterRunStatus:
    done = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
    return wait_for(lambda: (s := instance.get_run_by_id(run_id).status) in done and s,
                    120, f"run {run_id} to finish", interval=0.5)


def _firing(prometheus: Prometheus, alert: str, **labels: str) -> list[dict[str, Any]]:
    return [a for a in prometheus.alerts()
            if a["labels"]["alertname"] == alert and a["state"] == "firing"
            and labels.items() <= a["labels"].items()]


def _wait_firing(prometheus: Prometheus, rule: dict[str, Any], **labels: str) -> dict[str, Any]:
    """The shipped expression returns the failing series, and its at-once copy fires."""
    samples = prometheus.wait_for_data(rule["expr"], 60, f"{rule['alert']} to match")
    assert any(labels.items() <= s["metric"].items() for s in samples), samples
    for sample in samples:
        assert _alert_labels(rule) <= set(sample["metric"]), (rule["alert"], sample)
    wait_for(lambda: _firing(prometheus, rule["alert"] + "Now", **labels), 30,
             f"{rule['alert']}Now to fire", interval=0.5)
    return {"alert": rule["alert"], "expr": rule["expr"], "fired": True,
            "result": _summarize({"result": samples})}


def test_every_panel_and_alert_returns_data(
    tmp_path: Path, dagster_home: Path, start_worker, prometheus_factory,
) -> None:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis: RedisServer = start_redis(redis_dir)
    try:
        _scenario(tmp_path, dagster_home, redis, start_worker, prometheus_factory)
    finally:
        if redis.process.poll() is None:
            wait_stopped(redis.process)


def _scenario(tmp_path: Path, home: Path, redis: RedisServer, start_worker,
              prometheus_factory) -> None:
    # Our own Redis, not the session's: the test stops it.
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "telemetry": {"enabled": False},
        "run_launcher": {"module": "dagster_taskiq.launcher", "class": "TaskiqRunLauncher",
                         "config": {"broker": redis.url(), "default_queue": "dagster"}},
    }))

    ports = {"main": free_port(), "side": free_port(), "exporter": free_port()}
    start_worker(queues=["dagster"], concurrency=2, name="main", broker=redis.url(),
                 args=["--metrics-port", str(ports["main"]), "--metrics-host", "127.0.0.1"])
    side = start_worker(queues=["side"], concurrency=1, name="side", broker=redis.url(),
                        args=["--metrics-port", str(ports["side"]), "--metrics-host", "127.0.0.1"])
    exporter_log = tmp_path / "exporter.log"
    with open(exporter_log, "wb") as out:
        exporter = subprocess.Popen(
            [CLI, "exporter", "--host", "127.0.0.1", "--port", str(ports["exporter"])],
            stdout=out, stderr=subprocess.STDOUT, env=worker_env(redis.url()))
    try:
        config = local_config(
            {"dagster-taskiq-workers": [f"127.0.0.1:{ports['main']}",
                                        f"127.0.0.1:{ports['side']}"],
             "dagster-taskiq-exporter": [f"127.0.0.1:{ports['exporter']}"]},
            [ALERTS, rules_firing_at_once(tmp_path)])
        prometheus: Prometheus = prometheus_factory(config)
        prometheus.wait_for_data('min(up{job=~"dagster-taskiq-.*"}) == 1', 30,
                                 "every target to be scraped")
        _check(tmp_path, prometheus, redis, side, exporter)
    finally:
        if exporter.poll() is None:
            wait_stopped(exporter)
        print(exporter_log.read_text(errors="replace")[-3000:])


def _check(tmp_path: Path, prometheus: Prometheus, redis: RedisServer, side, exporter) -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"]
             for r in g["rules"]}
    started = time.time() - 2
    with DagsterInstance.get() as instance:
        run_id = _launch(instance, "monitored_job")
        # A run's duration is observed once, as it ends, and a rate needs the series to grow
        # after it first appears: a second run of the same job, ending a scrape later, does it.
        for _ in range(2):
            quick = _launch(instance, "quick_job")
            assert _finished(instance, quick) == DagsterRunStatus.SUCCESS
            time.sleep(2)  # the next scrape (1 s interval) sees this run's end alone
        # One step's process dies (os._exit), so the run fails; all others ran.
        assert _finished(instance, run_id) == DagsterRunStatus.FAILURE
    # The run tasks' durations are observed as they end: wait until Prometheus scraped them.
    prometheus.wait_for_data("sum(dagster_taskiq_run_duration_seconds_count) >= 3", 30,
                             "the three runs' durations to be scraped")
    prometheus.wait_for_data('sum(dagster_taskiq_task_outcomes_total{kind="run"}) > 0', 30,
                             "the run's outcome to be scraped")
    ended = time.time()

    dump: dict[str, Any] = {"variables": VARIABLES, "range": [started, ended], "panels": [],
                            "alerts": []}
    problems: list[str] = []
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        # label_values(metric, label): the values Grafana offers in the variable's dropdown.
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)",
                                     variable["query"]["query"]).groups()
        values = {s["metric"].get(label) for s in
                  prometheus.query(f"group by ({label}) ({metric})")["result"]}
        assert values == set(QUEUES), (variable["name"], values)
    for panel in (p for p in dashboard["panels"] if p["type"] != "row"):
        entry = {"title": panel["title"], "targets": []}
        for target in panel["targets"]:
            expr = _substitute(target["expr"])
            result = prometheus.query_range(expr, started, ended)
            summary = _summarize(result)
            entry["targets"].append({"legend": target["legendFormat"], "expr": expr,
                                     "result_type": result["resultType"], "series": summary})
            wanted = _legend_labels(target["legendFormat"])
            where = f"{panel['title']!r} {target['refId']}: {expr}"
            if result["resultType"] != "matrix" or not summary:
                problems.append(f"no data: {where}")
            elif not any(s["points"] for s in summary):
                problems.append(f"only NaN: {where}")
            for s in summary:
                if not wanted <= set(s["labels"]):
                    problems.append(f"labels {s['labels']} lack {wanted}: {where}")
                if "queue" in s["labels"] and s["labels"]["queue"] not in QUEUES:
                    problems.append(f"unknown queue {s['labels']}: {where}")
        dump["panels"].append(entry)

    # KEDA's scaling query, exactly as shipped, per queue: data for both queues, and never 0
    # while a step of the queue is in flight (a pool must not scale to zero under it).
    [keda] = re.findall(r"^\s*query: (.+)$", AUTOSCALING.read_text(), re.MULTILINE)
    dump["keda"] = []
    for queue in QUEUES:
        expr = keda.replace("{{ queue }}", queue)
        scaled = prometheus.query_range(expr, started, ended)["result"]
        inflight = prometheus.query_range(
            f'sum(dagster_taskiq_queue_inflight_tasks{{queue="{queue}"}})', started,
            ended)["result"]
        values = {t: float(v) for t, v in scaled[0]["values"]} if scaled else {}
        busy = [t for t, v in (inflight[0]["values"] if inflight else []) if float(v) > 0]
        dump["keda"].append({"queue": queue, "expr": expr, "max": max(values.values(),
                                                                     default=None),
                             "samples": len(values), "in_flight_samples": len(busy)})
        if not values:
            problems.append(f"KEDA query returns no data: {expr}")
        elif queue == "dagster" and not busy:
            problems.append("no step was ever in flight on the dagster queue")
        problems.extend(f"KEDA query is {values.get(t)} at {t} with work in flight: {expr}"
                        for t in busy if not values.get(t))

    # Every rule is a valid instant query now; those the scenario does not make fire must at
    # least watch live series (the expression without its threshold returns data).
    for name, rule in rules.items():
        prometheus.query(rule["expr"])
        if name in FIRED:
            continue
        signal = THRESHOLD.sub("", rule["expr"])
        assert signal != rule["expr"], f"{name}: no trailing threshold to strip"
        samples = prometheus.query(signal)["result"]
        dump["alerts"].append({"alert": name, "expr": rule["expr"], "fired": False,
                               "signal": signal, "result": _summarize({"result": samples})})
        if not samples:
            problems.append(f"alert {name}: its signal returns no data: {signal}")
        for s in samples:
            if not _alert_labels(rule) <= set(s["metric"]):
                problems.append(f"alert {name}: {s['metric']} lacks {_alert_labels(rule)}")

    path = _results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dump, indent=2) + "\n")  # again below, with the fired alerts

    # A crashed step: reported lost by the main worker.
    dump["alerts"].append(_wait_firing(prometheus, rules["DagsterTaskiqLostSteps"],
                                       queue="dagster"))
    # The side queue loses its only worker while a run waits on it.
    side.stop()
    with DagsterInstance.get() as instance:
        _launch(instance, "side_queue_job", tags={TASKIQ_QUEUE_TAG: "side"})
    dump["alerts"].append(_wait_firing(prometheus, rules["DagsterTaskiqQueueWithoutWorkers"],
                                       queue="side"))
    dump["alerts"].append(_wait_firing(prometheus, rules["DagsterTaskiqWorkerDown"]))
    # The broker goes away: the exporter says so; then the exporter itself goes away.
    wait_stopped(redis.process)
    dump["alerts"].append(_wait_firing(prometheus, rules["DagsterTaskiqRedisUnreachable"]))
    wait_stopped(exporter)
    dump["alerts"].append(_wait_firing(prometheus, rules["DagsterTaskiqExporterDown"]))
    assert {a["alert"] for a in dump["alerts"]} == set(rules)
    path.write_text(json.dumps(dump, indent=2) + "\n")
    assert not problems, "\n".join(problems)
