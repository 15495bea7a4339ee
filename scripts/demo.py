"""README command 1: example_project on the native stack, every example job on real workers.

Used by ``./quickstart.sh``: starts ``dagster-taskiq dev`` in ``example_project/`` (Redis, S3,
one worker per queue, code server, webserver, daemon), launches every example job through the
webserver's GraphQL API as the UI's Launch button does, waits for each run and prints one line
per step (job, step, queue, worker, attempts, duration, S3 objects written), then the UI address.
Exit code 0 only if every job did what it should. ``--keep`` leaves the stack (and the UI)
running until Ctrl-C; otherwise everything is stopped.

The GraphQL helpers here are shared with the end-to-end tests (``tests/e2e``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "example_project"
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
SUBMIT_RE = re.compile(
    r'Submitting taskiq task for step "(?P<step>[^"]+)" to queue "(?P<queue>[^"]+)"')


# -- GraphQL, as the UI speaks it ---------------------------------------------------------------

class GraphQL:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def __call__(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def jobs(self) -> list[dict[str, Any]]:
        """Every job of the workspace but Dagster's implicit asset job."""
        data = self("""{ repositoriesOrError { __typename ... on RepositoryConnection { nodes {
            name location { name } jobs { name isAssetJob tags { key value } } } } } }""")
        return [
            {"location": repo["location"]["name"], "repository": repo["name"], **job}
            for repo in data["repositoriesOrError"]["nodes"]
            for job in repo["jobs"]
            if not job["name"].startswith("__")
        ]

    def default_run_config(self, job: dict[str, Any]) -> dict[str, Any]:
        """The run config the launchpad starts from (the job's defaults)."""
        data = self("""query($selector: PipelineSelector!) {
            runConfigSchemaOrError(selector: $selector) { __typename
              ... on RunConfigSchema { rootDefaultYaml } ... on PythonError { message } } }""",
                    {"selector": _selector(job)})
        result = data["runConfigSchemaOrError"]
        if result["__typename"] != "RunConfigSchema":
            raise RuntimeError(f"No run config schema for {job['name']}: {result}")
        return yaml.safe_load(result["rootDefaultYaml"] or "") or {}

    def launch(self, job: dict[str, Any]) -> str:
        """launchRun with the job's default run config and tags; returns the run id."""
        data = self("""mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
            __typename ... on LaunchRunSuccess { run { runId } }
            ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } }
            ... on Error { message } } }""", {"params": {
            "selector": _selector(job),
            "runConfigData": self.default_run_config(job),
            "executionMetadata": {"tags": job.get("tags") or []},
        }})
        result = data["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(f"Launching {job['name']} failed: {result}")
        return str(result["run"]["runId"])

    def status(self, run_id: str) -> str:
        data = self("""query($id: ID!) { runOrError(runId: $id) { __typename
            ... on Run { status } } }""", {"id": run_id})
        return str(data["runOrError"]["status"])

    def events(self, run_id: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        cursor = None
        while True:
            data = self("""query($id: ID!, $cursor: String) {
                logsForRun(runId: $id, afterCursor: $cursor, limit: 1000) { __typename
                  ... on EventConnection { cursor hasMore events { __typename
                    ... on MessageEvent { message timestamp stepKey eventType }
                    ... on EngineEvent { metadataEntries { label
                        ... on TextMetadataEntry { text } } }
                    ... on HandledOutputEvent { metadataEntries { label
                        ... on PathMetadataEntry { path } } }
                    ... on ExecutionStepUpForRetryEvent {
                        error { message causes { message } } } } } } }""",
                        {"id": run_id, "cursor": cursor})
            connection = data["logsForRun"]
            events += connection["events"]
            cursor = connection["cursor"]
            if not connection["hasMore"]:
                return events


def _selector(job: dict[str, Any]) -> dict[str, str]:
    return {"repositoryLocationName": job["location"], "repositoryName": job["repository"],
            "pipelineName": job["name"]}


# -- what ran where -----------------------------------------------------------------------------

@dataclass
class StepReport:
    key: str
    queue: str | None = None
    workers: list[str] = field(default_factory=list)
    attempts: int = 0
    started: float | None = None
    finished: float | None = None
    outcome: str = "?"
    outputs: list[str] = field(default_factory=list)  # s3:// URIs the IO manager wrote

    @property
    def duration(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started


@dataclass
class RunReport:
    job: str
    run_id: str
    status: str
    steps: dict[str, StepReport]
    events: list[dict[str, Any]]
    started: float | None = None

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("eventType") == event_type]


def _metadata(event: dict[str, Any], label: str) -> str | None:
    for entry in event.get("metadataEntries") or []:
        if entry.get("label") == label:
            return entry.get("text") or entry.get("path")
    return None


def report_run(gql: GraphQL, job: str, run_id: str) -> RunReport:
    events = gql.events(run_id)
    steps: dict[str, StepReport] = {}
    report = RunReport(job, run_id, gql.status(run_id), steps, events)
    for event in events:
        stamp = float(event["timestamp"]) / 1000
        kind, key = event.get("eventType"), event.get("stepKey")
        if kind == "RUN_START":
            report.started = stamp
        message = event.get("message") or ""
        match = SUBMIT_RE.search(message)
        if match:
            steps.setdefault(match["step"], StepReport(match["step"])).queue = match["queue"]
            continue
        if not key:
            continue
        step = steps.setdefault(key, StepReport(key))
        if message.startswith("Executing steps") and "taskiq worker" in message:
            step.workers.append(_metadata(event, "taskiq worker") or "?")
        elif kind in ("STEP_START", "STEP_RESTARTED"):
            step.attempts += 1
            step.started = step.started or stamp
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE"):
            step.finished = stamp
            step.outcome = "success" if kind == "STEP_SUCCESS" else "failure"
        elif kind == "STEP_UP_FOR_RETRY":
            step.outcome = "retry"
        elif kind == "HANDLED_OUTPUT":
            uri = _metadata(event, "uri")
            if uri:
                step.outputs.append(uri)
    return report


def wait_for_runs(gql: GraphQL, run_ids: Iterable[str], timeout: float) -> dict[str, str]:
    pending = set(run_ids)
    statuses: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for run_id in list(pending):
            status = gql.status(run_id)
            if status in TERMINAL:
                statuses[run_id] = status
                pending.discard(run_id)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"Runs still not finished after {timeout:.0f} s: {pending}")
        time.sleep(0.5)
    return statuses


def s3_objects(client: Any, bucket: str, uris: Iterable[str]) -> dict[str, bool]:
    """Whether each s3://bucket/key the IO manager reported exists in the bucket."""
    found = {}
    for uri in uris:
        key = uri.removeprefix(f"s3://{bucket}/")
        try:
            client.head_object(Bucket=bucket, Key=key)
            found[uri] = True
        except Exception:
            found[uri] = False
    return found


def problems(report: RunReport, s3_found: dict[str, bool]) -> list[str]:
    """What the run did not do that it should have (empty when all is well)."""
    issues = []
    if report.status != "SUCCESS":
        issues.append(f"run ended {report.status}")
    for step in report.steps.values():
        if not step.queue:
            issues.append(f"{step.key}: never submitted to a taskiq queue")
        if not step.workers:
            issues.append(f"{step.key}: no taskiq worker ran it")
        elif step.queue and any(w != f"worker-{step.queue}" for w in step.workers):
            issues.append(f"{step.key}: ran on {step.workers}, not a worker of queue {step.queue}")
        missing = [uri for uri in step.outputs if not s3_found.get(uri)]
        if missing:
            issues.append(f"{step.key}: outputs missing from S3: {missing}")
    if report.job == "retry_once":
        if not report.of_type("STEP_UP_FOR_RETRY"):
            issues.append("the first attempt did not fail and retry")
        if not report.of_type("STEP_SUCCESS"):
            issues.append("no attempt succeeded")
    return issues


def _short(uri: str, run_id: str) -> str:
    """The object's key, with the run id cut to 8 characters as the UI shows it."""
    return uri.split("/", 3)[-1].replace(run_id, run_id[:8])


def format_table(reports: list[RunReport]) -> str:
    rows = [["JOB", "STEP", "QUEUE", "WORKER", "ATTEMPTS", "DURATION", "S3 OBJECTS"]]
    for report in reports:
        for step in sorted(report.steps.values(), key=lambda s: s.started or 0):
            duration = f"{step.duration:.2f}s" if step.duration is not None else "-"
            rows.append([report.job, step.key, step.queue or "-",
                         ",".join(dict.fromkeys(step.workers)) or "-", str(step.attempts),
                         duration, ", ".join(_short(uri, report.run_id) for uri in step.outputs)
                         or "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


# -- the stack ----------------------------------------------------------------------------------

@dataclass
class DevStack:
    """A running ``dagster-taskiq dev`` and what its three lines said."""

    process: subprocess.Popen[str]
    url: str
    redis: str
    s3_endpoint: str
    bucket: str
    log: Path
    lines: list[str]
    keys: tuple[str, str]  # the S3 keys dev started its server with (from its environment)

    def s3_client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                            aws_access_key_id=self.keys[0], aws_secret_access_key=self.keys[1])

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_dev(project: Path, args: list[str], log: Path, env: dict[str, str] | None = None,
              timeout: float = 300) -> DevStack:
    """``dagster-taskiq dev`` in ``project`` with ``args``; returns once it printed ``ready:``
    (its service logs go to ``log``)."""
    cli = Path(sys.executable).parent / "dagster-taskiq"
    env = env or dict(os.environ)
    errors = open(log, "w")  # noqa: SIM115 - the child writes to it for its whole life
    process = subprocess.Popen([str(cli), "dev", *args], cwd=project, stdout=subprocess.PIPE,
                               stderr=errors, text=True, env=env)
    errors.close()
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("ready: "):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
            raise RuntimeError(f"dagster-taskiq dev did not become ready (exit code "
                               f"{process.returncode}). Last lines of {log}:\n{log_tail(log)}")
    said = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in lines if ": " in line}
    endpoint, _, bucket = said["s3"].partition(" bucket=")
    keys = (env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", ""))
    return DevStack(process, said["ready"], said["redis"], endpoint, bucket, log, lines, keys)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_all_jobs(stack: DevStack, out: IO[str]) -> tuple[list[RunReport], list[str]]:
    gql = GraphQL(stack.url)
    jobs = gql.jobs()
    runs = {gql.launch(job): job["name"] for job in jobs}
    out.write(f"Launched {len(runs)} runs through {stack.url}/graphql: "
              f"{', '.join(sorted(runs.values()))}\n")
    out.flush()
    wait_for_runs(gql, runs, timeout=300)
    reports = sorted((report_run(gql, job, run_id) for run_id, job in runs.items()),
                     key=lambda r: r.job)
    client = stack.s3_client()
    failures = []
    for report in reports:
        uris = [uri for step in report.steps.values() for uri in step.outputs]
        found = s3_objects(client, stack.bucket, uris)
        failures += [f"{report.job}: {p}" for p in problems(report, found)]
    return reports, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true",
                        help="Keep the stack and the UI running after the jobs (Ctrl-C stops it).")
    parser.add_argument("--port", type=int, default=None,
                        help="UI port (default 3000, or a free port if 3000 is taken).")
    options = parser.parse_args()
    port = options.port or (3000 if port_free(3000) else free_port())
    # The keys the S3 server is started with, so that we can look at what the runs wrote.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "quickstart")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", secrets.token_hex(16))
    work = Path(tempfile.mkdtemp(prefix="dagster-taskiq-quickstart-"))
    log = work / "dev.log"
    started = time.monotonic()
    print(f"==> starting the native stack for example_project (logs: {log})", flush=True)
    try:
        stack = start_dev(EXAMPLE, ["--port", str(port)], log)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        for line in stack.lines:
            print(line)
        print(f"==> stack ready in {time.monotonic() - started:.0f} s", flush=True)
        try:
            reports, failures = run_all_jobs(stack, sys.stdout)
        except Exception as exc:
            print(f"Running the example jobs failed: {exc}\nLast lines of {log}:\n"
                  f"{log_tail(log)}", file=sys.stderr)
            return 1
        print()
        print(format_table(reports))
        print()
        steps = sum(len(r.steps) for r in reports)
        objects = sum(len(s.outputs) for r in reports for s in r.steps.values())
        if failures:
            print("NOT OK:\n  " + "\n  ".join(failures))
        else:
            print(f"OK: {len(reports)} jobs, {steps} steps on taskiq workers, {objects} S3 "
                  f"objects written to bucket {stack.bucket} "
                  f"({time.monotonic() - started:.0f} s in all).")
        print(f"UI: {stack.url} (Runs tab: every run above, with its logs)")
        if options.keep:
            print("The stack keeps running (--keep): press Ctrl-C to stop it.", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                stack.process.wait()
        return 1 if failures else 0
    finally:
        code = stack.stop()
        if code not in (0, None):
            print(f"dagster-taskiq dev exited with code {code}; see {log}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
