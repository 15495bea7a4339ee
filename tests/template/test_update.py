"""`copier update` from an older tagged template to HEAD keeps what the user changed.

Runs against a private clone of this repository (tags are made there, never here).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from copier import run_copy, run_update

# Expected while the template has uncommitted changes: they are what we test.
pytestmark = pytest.mark.filterwarnings("ignore::copier.errors.DirtyLocalWarning")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_update_from_tag_to_head_keeps_user_edits(template_clone: Path, tmp_path: Path) -> None:
    git(template_clone, "tag", "v0.1.0")
    project = tmp_path / "project"
    run_copy(str(template_clone), str(project), defaults=True, vcs_ref="v0.1.0", quiet=True)
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["_commit"] == "v0.1.0"
    package = answers["package_name"]
    env_before = (project / ".env").read_text()
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated")

    # The user's own work: an edited example, a new module, README notes, a local setting.
    hello = project / "src" / package / "defs" / "examples" / "hello.py"
    edit(hello, 'message = f"Hello from a taskiq worker', 'message = f"Howdy from a taskiq worker')
    own = project / "src" / package / "defs" / "reports.py"
    own.write_text('"""Our own job."""\n\nimport dagster as dg\n\n\n@dg.op\ndef ours() -> int:\n'
                   "    return 1\n\n\n@dg.job\ndef our_job() -> None:\n    ours()\n")
    readme = project / "README.md"
    readme.write_text(readme.read_text() + "\n## Team notes\n\nOn call: the data team.\n")
    edit(project / ".env", "WORKER_CONCURRENCY=2", "WORKER_CONCURRENCY=6")
    env_edited = (project / ".env").read_text()
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "our changes")

    # A newer template: a README section and a compose setting change.
    edit(template_clone / "template" / "README.md.jinja", "## Layout",
         "## Troubleshooting\n\nRun `docker compose logs -f`.\n\n## Layout")
    edit(template_clone / "template" / "compose.yaml.jinja", "stop_grace_period: 60s",
         "stop_grace_period: 90s")
    git(template_clone, "commit", "-q", "-am", "template: troubleshooting, longer grace")

    run_update(
        str(project),
        data={"queues": ["short", "long", "gpu"]},  # one answer changes on the way
        defaults=True,
        overwrite=True,
        vcs_ref="HEAD",
        quiet=True,
    )

    # The template's changes arrived...
    readme_text = readme.read_text()
    assert "## Troubleshooting" in readme_text
    compose = (project / "compose.yaml").read_text()
    assert "stop_grace_period: 90s" in compose
    assert "stop_grace_period: 60s" not in compose
    assert "worker-gpu:" in compose
    assert '"gpu"' in (project / "src" / package / "queues.py").read_text()
    # ...and every edit of the user's is still there.
    assert "Howdy from a taskiq worker" in hello.read_text()
    assert own.exists() and "def our_job" in own.read_text()
    assert "## Team notes" in readme_text
    assert (project / ".env").read_text() == env_edited != env_before
    # Cleanly: no conflict markers, no rejected hunks.
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert not path.name.endswith(".rej"), path
            assert "<<<<<<<" not in path.read_text(errors="replace"), path
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["_commit"] != "v0.1.0"
    assert answers["queues"] == ["short", "long", "gpu"]


def test_update_to_kubernetes_keeps_user_edits(template_clone: Path, tmp_path: Path) -> None:
    """From the last template version without `deploy_targets` to HEAD, choosing Kubernetes:
    deploy/kubernetes/ arrives, the user's edits stay, nothing conflicts."""
    introduced = git(template_clone, "log", "--format=%H", "-S", "deploy_targets:",
                     "--", "copier.yml").split()
    assert introduced, "copier.yml never gained deploy_targets"
    git(template_clone, "tag", "before-k8s", f"{introduced[-1]}^")
    project = tmp_path / "project"
    run_copy(str(template_clone), str(project), defaults=True, vcs_ref="before-k8s", quiet=True)
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert "deploy_targets" not in answers and not (project / "deploy").exists()
    package = answers["package_name"]
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated")

    hello = project / "src" / package / "defs" / "examples" / "hello.py"
    edit(hello, 'message = f"Hello from a taskiq worker', 'message = f"Howdy from a taskiq worker')
    readme = project / "README.md"
    readme.write_text(readme.read_text() + "\n## Team notes\n\nOn call: the data team.\n")
    edit(project / "compose.yaml", "stop_grace_period: 60s", "stop_grace_period: 75s")
    git(project, "commit", "-q", "-am", "our changes")

    run_update(str(project), data={"deploy_targets": "compose+kubernetes"}, defaults=True,
               overwrite=True, vcs_ref="HEAD", quiet=True)

    kube = project / "deploy" / "kubernetes"
    for name in ("kustomization.yaml", "helm-values.yaml", "autoscaling.yaml",
                 "dagster-taskiq.yaml", "secrets.example.env", "README.md", ".gitignore"):
        assert (kube / name).is_file(), name
    assert "worker-short" in (kube / "autoscaling.yaml").read_text()
    assert "deploy/kubernetes/README.md" in readme.read_text()
    assert "Howdy from a taskiq worker" in hello.read_text()
    assert "## Team notes" in readme.read_text()
    assert "stop_grace_period: 75s" in (project / "compose.yaml").read_text()
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert not path.name.endswith(".rej"), path
            assert "<<<<<<<" not in path.read_text(errors="replace"), path
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["deploy_targets"] == "compose+kubernetes"
