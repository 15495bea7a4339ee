"""Edit an op, reload the location from the UI's API, launch: the new behaviour runs.

On a copy of example_project under ``dagster-taskiq dev`` (sqlite storage): the run's
orchestrator and its step both run on workers forked from zygotes that loaded the old code;
the workers notice the edit and load the new code before the next launch.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from scripts.demo import EXAMPLE, GraphQL, start_dev, wait_for_runs
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.timeout(600)

HELLO = Path("src/my_dagster_project/defs/examples/hello.py")


def _messages(gql: GraphQL, run_id: str) -> list[str]:
    return [event.get("message") or "" for event in gql.events(run_id)]


def _launch_hello(gql: GraphQL) -> list[str]:
    job = next(job for job in gql.jobs() if job["name"] == "hello")
    run_id = gql.launch(job)
    assert wait_for_runs(gql, [run_id], 240) == {run_id: "SUCCESS"}
    return _messages(gql, run_id)


def test_an_edited_op_runs_new_code_after_a_reload(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(
        ".venv", "__pycache__", ".dagster-taskiq-dev*"))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "e2e", "AWS_SECRET_ACCESS_KEY": "e2e-secret-key1"}
    stack = start_dev(project, ["--port", str(free_port())], tmp_path / "dev.log", env=env)
    try:
        gql = GraphQL(stack.url)
        assert any("Hello from a taskiq worker" in m for m in _launch_hello(gql))

        hello = project / HELLO
        time.sleep(0.05)  # a later mtime whatever the file system's resolution
        hello.write_text(hello.read_text().replace('f"Hello from a taskiq worker',
                                                   'f"Edited hello from a taskiq worker'))
        data = gql("""mutation($name: String!) { reloadRepositoryLocation(
            repositoryLocationName: $name) { __typename } }""",
                   {"name": "my_dagster_project"})
        assert data["reloadRepositoryLocation"]["__typename"] == "WorkspaceLocationEntry"
        wait_for(lambda: any(j["name"] == "hello" for j in gql.jobs()), 120,
                 "the location to load again")

        messages = _launch_hello(gql)
        assert any("Edited hello from a taskiq worker" in m for m in messages), messages
        assert "changed" in (tmp_path / "dev.log").read_text()  # the workers reloaded
    finally:
        assert stack.stop() == 0
