"""Every rendered project passes its own lint, its own tests and Dagster's validation.

All with this repository's virtualenv: the rendered project's ``src`` goes first on the path,
so its vendored dagster_taskiq is the one imported.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from tests.template.conftest import Rendered, assert_ok, run, tool


def test_ruff_check(rendered: Rendered) -> None:
    assert_ok(run([tool("ruff"), "check", "--no-cache", "."], rendered.path), "ruff check")


def test_dagster_definitions_validate(rendered: Rendered) -> None:
    result = run(
        [tool("dagster"), "definitions", "validate"],
        rendered.path,
        env={"PYTHONPATH": str(rendered.path / "src")},
    )
    assert_ok(result, "dagster definitions validate")
    assert f"Validation successful for code location {rendered.package}" in (
        result.stdout + result.stderr
    )


def test_project_pytest(rendered: Rendered, request: pytest.FixtureRequest) -> None:
    """The project's own tests: its example jobs through the taskiq executor (eager mode)
    against a real S3 endpoint. The default render starts its own endpoint (exercising its
    fixture); the others share this session's."""
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    if rendered.name != "defaults":
        endpoint = request.getfixturevalue("s3_endpoint")
        env |= {
            "TEST_S3_ENDPOINT_URL": endpoint.url,
            "AWS_ACCESS_KEY_ID": endpoint.access_key,
            "AWS_SECRET_ACCESS_KEY": endpoint.secret_key,
        }
    result = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"],
        rendered.path,
        env=env,
        timeout=240,
    )
    assert_ok(result, "the rendered project's pytest")
    summary = result.stdout.strip().splitlines()[-1]
    expected_min = 9 if rendered.answers["include_examples"] else 5
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= expected_min and "failed" not in summary and "skipped" not in summary, summary


# Once, for the answer set whose Python version is this interpreter's.
@pytest.mark.parametrize("rendered", ["many-queues-custom-package"], indirect=True)
def test_pyproject_resolves(rendered: Rendered) -> None:
    """The generated pyproject.toml resolves (uv's cache makes this fast after the first)."""
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv is required (it runs this test suite)"
    result = run([uv, "lock", "--python", sys.executable], rendered.path,
                 env={"UV_PYTHON_DOWNLOADS": "never"}, timeout=240)
    assert_ok(result, "uv lock")
    lock = (rendered.path / "uv.lock").read_text()
    for package in ("dagster", "dagster-aws", "dagster-postgres", "dagster-webserver", "taskiq",
                    "redis", "click"):
        assert f'name = "{package}"' in lock
    (rendered.path / "uv.lock").unlink()  # keep the shared render as copier made it
