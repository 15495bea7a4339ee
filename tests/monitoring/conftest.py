"""A real Prometheus (Debian's ``prometheus`` package) for the dashboard and alert tests.

The binary runs on a free port with a temporary config and storage directory; the machine's
own Prometheus service (if any) is never touched.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import free_port, wait_for
from tests.executor.conftest import start_worker  # noqa: F401 - the fixture, for these tests

REPO = Path(__file__).resolve().parents[2]
# What the template ships; alerts and dashboards are copied verbatim, prometheus.yml is
# rendered per project (its worker service names), so its rendering in example_project is read.
MONITORING = REPO / "template" / "monitoring"
RENDERED_PROMETHEUS_YML = REPO / "example_project" / "monitoring" / "prometheus.yml"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "dagster-taskiq.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "dagster-taskiq.yml"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: apt-get install prometheus (.ci/run does)")
    return path


def local_config(targets: dict[str, list[str]], rule_files: list[Path]) -> dict[str, Any]:
    """The shipped prometheus.yml with this machine's targets in place of compose's DNS names,
    and a 1 s scrape and evaluation interval; scrape job names, labels and rules stay as shipped."""
    config = yaml.safe_load(RENDERED_PROMETHEUS_YML.read_text())
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s",
                        "evaluation_interval": "1s", "scrape_timeout": "1s"}
    config["rule_files"] = [str(path) for path in rule_files]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(targets), f"the test covers every shipped scrape job: {jobs}"
    for job in config["scrape_configs"]:
        for discovery in ("dns_sd_configs", "static_configs"):
            job.pop(discovery, None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    session: requests.Session = field(init=False)

    def __post_init__(self) -> None:
        self.session = requests.Session()

    def _get(self, path: str, **params: Any) -> Any:
        response = self.session.get(self.url + path, params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> dict[str, Any]:
        return self._get("/api/v1/query", query=expr)

    def query_range(self, expr: str, start: float, end: float, step: float = 1) -> dict[str, Any]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)

    def alerts(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/alerts")["alerts"]

    def wait_for_data(self, expr: str, timeout: float, what: str) -> list[dict[str, Any]]:
        """Waits until ``expr`` returns a sample with a finite value; returns the samples."""

        def answered() -> list[dict[str, Any]]:
            result = self.query(expr)["result"]
            return [s for s in result if math.isfinite(float(s["value"][1]))]

        return wait_for(answered, timeout, what, interval=0.5)


def start_prometheus(directory: Path, config: dict[str, Any]) -> Prometheus:
    config_file = directory / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    check = subprocess.run([tool("promtool"), "check", "config", str(config_file)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = open(directory / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [tool("prometheus"), f"--config.file={config_file}",
         f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--web.enable-lifecycle"],
        stdout=log, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", process)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{(directory / 'prometheus.log').read_text()}")
        try:
            return server.session.get(server.url + "/-/ready", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_for(ready, 30, f"prometheus on port {port}", interval=0.2)
    return server


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def _start(config: dict[str, Any]) -> Prometheus:
        directory = tmp_path / f"prometheus{len(started)}"
        directory.mkdir()
        server = start_prometheus(directory, config)
        started.append(server)
        return server

    yield _start
    for server in started:
        server.session.close()
        server.process.terminate()
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(5)


def rules_firing_at_once(directory: Path) -> Path:
    """A copy of the shipped rules, each renamed ``<name>Now`` and without ``for:``: Prometheus
    fires them on the first evaluation that matches, so a test sees the exact shipped
    expressions fire without waiting out their `for:` durations."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        group["name"] += "-now"
        for rule in group["rules"]:
            rule["alert"] += "Now"
            rule.pop("for", None)
    path = directory / "alerts-now.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def wait_stopped(process: subprocess.Popen, timeout: float = 20) -> None:
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
