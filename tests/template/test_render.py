"""What copier renders: files per answer set, one source of truth, secrets, bad answers."""

from __future__ import annotations

import filecmp
import re
from pathlib import Path

import pytest
from copier import run_copy

from scripts.render_example import EXAMPLE, REPO, differences, render
from tests.template.conftest import Rendered

# Expected while the template has uncommitted changes: they are what we test.
pytestmark = pytest.mark.filterwarnings("ignore::copier.errors.DirtyLocalWarning")

ALWAYS = [
    ".copier-answers.yml",
    ".dockerignore",
    ".env",
    ".env.example",
    ".gitignore",
    ".python-version",
    "Dockerfile",
    "README.md",
    "compose.yaml",
    "docker/dagster.yaml",
    "docker/healthcheck.py",
    "docker/redis.conf",
    "docker/with-secrets",
    "docker/workspace.yaml",
    "monitoring/alerts.yml",
    "monitoring/grafana/dashboards/dagster-taskiq.json",
    "monitoring/grafana/provisioning/dashboards/dagster-taskiq.yml",
    "monitoring/grafana/provisioning/datasources/prometheus.yml",
    "monitoring/prometheus.yml",
    "pyproject.toml",
    "src/{pkg}/__init__.py",
    "src/{pkg}/definitions.py",
    "src/{pkg}/defs/__init__.py",
    "src/{pkg}/defs/resources.py",
    "src/{pkg}/queues.py",
    "src/{pkg}/storage.py",
    "src/dagster_taskiq/__init__.py",
    "src/dagster_taskiq/cli.py",
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/jobs.py",
    "tests/test_definitions.py",
    "tests/test_storage.py",
]
EXAMPLES = [
    "src/{pkg}/defs/examples/__init__.py",
    "src/{pkg}/defs/examples/assets.py",
    "src/{pkg}/defs/examples/fan_out.py",
    "src/{pkg}/defs/examples/hello.py",
    "src/{pkg}/defs/examples/retry.py",
    "src/{pkg}/defs/examples/run_priority.py",
    "tests/test_examples.py",
]


def test_expected_files(rendered: Rendered) -> None:
    expected = {p.format(pkg=rendered.package) for p in ALWAYS}
    examples = {p.format(pkg=rendered.package) for p in EXAMPLES}
    root = rendered.path
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert expected <= files, expected - files
    if rendered.answers["include_examples"]:
        assert examples <= files, examples - files
    else:
        assert not examples & files
        assert not (rendered.path / "src" / rendered.package / "defs" / "examples").exists()
    leftovers = [f for f in files if f.endswith(".jinja") or "__pycache__" in f or "{{" in f]
    assert not leftovers
    # Nothing unrendered (dagster.yaml's `{env: X}` is single-braced and fine). The vendored
    # package is copied verbatim, f-strings and all, and checked byte for byte elsewhere.
    # Alert annotations and Grafana legends use their own `{{ }}`, copied verbatim too.
    verbatim = {f for f in files if f.startswith("src/dagster_taskiq/")} | {
        "monitoring/alerts.yml", "monitoring/grafana/dashboards/dagster-taskiq.json"}
    for name in files - verbatim:
        text = (rendered.path / name).read_text()
        assert not re.search(r"\{\{|\{%|\{#", text), f"unrendered Jinja in {name}"


def test_names_flow_through(rendered: Rendered) -> None:
    """One code location name everywhere; the distribution name is normalised."""
    package = rendered.package
    assert package.isidentifier()
    pyproject = (rendered.path / "pyproject.toml").read_text()
    distribution = re.sub(r"[^a-z0-9]+", "-", rendered.answers["project_name"].lower()).strip("-")
    assert f'name = "{distribution}"' in pyproject
    assert f'root_module = "{package}"' in pyproject
    assert f'code_location_name = "{package}"' in pyproject
    assert f"location_name: {package}" in (rendered.path / "docker/workspace.yaml").read_text()
    compose = (rendered.path / "compose.yaml").read_text()
    assert f'"--location-name", "{package}"' in compose
    assert f'"-m", "{package}.definitions"' in compose
    assert f'"--location-name", "{package}"' in (rendered.path / "Dockerfile").read_text()
    assert f'requires-python = ">={rendered.answers["python_version"]},' in pyproject


def test_dagster_taskiq_is_vendored_identically(rendered: Rendered) -> None:
    source = REPO / "dagster_taskiq"
    vendored = rendered.path / "src" / "dagster_taskiq"
    assert not vendored.is_symlink()
    # The modules and the Lua scripts they load (lua/*.lua), nothing else (no caches).
    wanted = sorted(str(p.relative_to(source)) for p in source.rglob("*")
                    if p.suffix in (".py", ".lua") and "__pycache__" not in p.parts)
    assert "lua/claim.lua" in wanted
    assert sorted(str(p.relative_to(vendored)) for p in vendored.rglob("*") if p.is_file()) \
        == wanted
    _, mismatch, errors = filecmp.cmpfiles(source, vendored, wanted, shallow=False)
    assert mismatch == errors == []
    assert 'dagster-taskiq = "dagster_taskiq.cli:main"' in (
        rendered.path / "pyproject.toml"
    ).read_text()


def test_template_links_to_single_sources() -> None:
    """The template holds links, not copies, of what lives elsewhere in this repository."""
    link = REPO / "template" / "src" / "dagster_taskiq"
    assert link.is_symlink() and link.resolve() == (REPO / "dagster_taskiq").resolve()
    redis_conf = REPO / "template" / "docker" / "redis.conf"
    assert redis_conf.is_symlink()
    assert redis_conf.resolve() == (REPO / "compose" / "redis" / "redis.conf").resolve()


def test_secrets_are_random_per_project(rendered: Rendered, tmp_path: Path) -> None:
    """.env gets fresh random passwords; .env.example and the rest only placeholders."""

    def values(path: Path) -> dict[str, str]:
        pairs = (line.split("=", 1) for line in path.read_text().splitlines())
        return {k: v for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}

    env, example = values(rendered.path / ".env"), values(rendered.path / ".env.example")
    assert env.keys() == example.keys()
    secrets = [k for k in env if k.endswith(("PASSWORD", "SECRET_ACCESS_KEY"))]
    if rendered.answers["s3_backend"] == "external":
        assert env["S3_SECRET_ACCESS_KEY"] == env["S3_ACCESS_KEY_ID"] == ""
        secrets.remove("S3_SECRET_ACCESS_KEY")
    assert len(secrets) >= 2
    generated = [env[k] for k in secrets]
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in generated), generated
    assert len(set(generated)) == len(generated)
    assert all(example[k].startswith("change-me") for k in secrets)
    assert ".env" in (rendered.path / ".gitignore").read_text().splitlines()
    assert ".env" in (rendered.path / ".dockerignore").read_text().splitlines()
    # No generated password appears in any file but .env.
    for path in rendered.path.rglob("*"):
        if path.is_file() and path.name != ".env":
            text = path.read_text(errors="replace")
            assert not any(v in text for v in generated), path


def test_each_render_gets_its_own_secrets(tmp_path: Path) -> None:
    first = render(tmp_path / "a").joinpath(".env").read_text()
    second = render(tmp_path / "b").joinpath(".env").read_text()
    assert first != second


def test_example_project_equals_a_fresh_render(tmp_path: Path) -> None:
    fresh = render(tmp_path / "example_project")
    report = differences(fresh, EXAMPLE)
    assert not report, (
        "example_project/ differs from a fresh render; regenerate it with "
        "`uv run python -m scripts.render_example`:\n" + "\n".join(report)[:8000]
    )


BAD_ANSWERS = [
    ({"project_name": "2fast"}, "must start with a letter"),
    ({"project_name": "my/project"}, "must start with a letter and contain only"),
    ({"project_name": "trailing-"}, "must end with a letter or a digit"),
    ({"package_name": "My-Package"}, "must be a lowercase Python identifier"),
    ({"package_name": "1abc"}, "must be a lowercase Python identifier"),
    ({"package_name": "class"}, "is a Python keyword"),
    ({"package_name": "dagster_taskiq"}, "would shadow a module"),
    ({"description": "two\nlines"}, "single line"),
    ({"description": "   "}, "must not be empty"),
    ({"queues": "short"}, "must be a YAML list"),
    ({"queues": {"a": 1}}, "must be a YAML list"),
    ({"queues": ["short", "short"]}, "must be unique"),
    ({"queues": ["Bad Queue"]}, 'Queue "Bad Queue" is not a valid name'),
    ({"s3_bucket": "AB"}, "3-63 characters"),
    ({"s3_bucket": "my..bucket"}, 'must not contain ".."'),
    ({"s3_bucket": "192.168.1.1"}, "look like an IP address"),
    ({"s3_backend": "gcs"}, "'gcs' is not in ['minio', 'seaweedfs', 'external']"),
    ({"python_version": "3.9"}, "'3.9' is not in ['3.11', '3.12', '3.13']"),
]


@pytest.mark.parametrize(("data", "message"), BAD_ANSWERS, ids=[str(d) for d, _ in BAD_ANSWERS])
def test_bad_answers_are_rejected(data: dict, message: str, tmp_path: Path) -> None:
    destination = tmp_path / "project"
    with pytest.raises(ValueError, match=re.escape(message)):
        run_copy(str(REPO), str(destination), data=data, defaults=True, vcs_ref="HEAD",
                 quiet=True)
    assert not destination.exists() or not any(destination.iterdir())


@pytest.mark.parametrize(("queues", "extra"), [
    (["dagster"], []),
    (["short", "dagster", "gpu"], ["short", "gpu"]),
])
def test_listing_the_default_queue_changes_nothing(queues: list[str], extra: list[str],
                                                   tmp_path: Path) -> None:
    """A user may naturally name "dagster": it is the default queue, which always exists."""
    project = render(tmp_path / "project", {"queues": queues})
    package = "my_dagster_project"
    namespace: dict = {}
    exec((project / "src" / package / "queues.py").read_text(), namespace)
    assert list(namespace["QUEUES"]) == extra
    assert list(namespace["ALL_QUEUES"]) == ["dagster", *extra]
    compose = (project / "compose.yaml").read_text()
    workers = re.findall(r"^  (worker-[a-z0-9_-]+):$", compose, re.MULTILINE)
    assert workers == [f"worker-{q}" for q in ["dagster", *extra]]
