"""The code a zygote has loaded: its definitions, built once, and the files they came from.

Dagster keeps one repository and one job definition per process (``lru_cache(maxsize=1)`` on
``ReconstructableJob``), and rebuilds a repository from its code pointer every time, which for a
``@dg.definitions`` project means loading its whole defs folder again: steps of two jobs taking
turns missed every time. A zygote holds exactly one version of the code, so it keeps every
repository, job and subset it builds (:func:`install_definitions_cache`); a changed file means a
new zygote (:class:`SourceFiles`), never a stale entry here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import sysconfig
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

_CACHE_SIZE = 256  # definitions per zygote: every job and subset of a few repositories


def install_definitions_cache() -> None:
    """Make Dagster's repository and job loading keep what it built, for this process (the
    zygote, and every task forked from it)."""
    from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository

    if getattr(ReconstructableRepository.get_definition, "_dagster_taskiq_cached", False):
        return
    ReconstructableRepository.get_definition = _kept(  # ty: ignore[invalid-assignment]
        ReconstructableRepository.get_definition)
    ReconstructableJob.get_definition = _kept(  # ty: ignore[invalid-assignment]
        ReconstructableJob.get_definition.__wrapped__)
    ReconstructableJob.get_repository_definition = _kept(  # ty: ignore[invalid-assignment]
        ReconstructableJob.get_repository_definition.__wrapped__)


def _kept(build: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``build(self)`` memoized by ``self`` (reconstructables are hashable named tuples); only
    successes are kept, so an import error is raised again, not remembered."""
    built: dict[Any, Any] = {}

    @functools.wraps(build)
    def get(self: Any) -> Any:
        try:
            return built[self]
        except KeyError:
            pass
        value = build(self)
        built[self] = value
        while len(built) > _CACHE_SIZE:
            del built[next(iter(built))]
        return value

    get._dagster_taskiq_cached = True  # type: ignore[attr-defined]
    get.built = built  # type: ignore[attr-defined]
    return get


def loaded_repositories() -> list[Any]:
    """The repositories this process has built (to build again in a zygote that replaces it)."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    return list(getattr(ReconstructableRepository.get_definition, "built", {}))


_DATA_SUFFIXES = (".yaml", ".yml", ".sql", ".json", ".toml")


def _package_root(path: Path) -> Path:
    """The outermost package directory holding ``path`` (its own folder for a plain file)."""
    folder = path.parent
    while (folder.parent / "__init__.py").exists():
        folder = folder.parent
    return folder


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    roots.add(sys.base_prefix)
    return tuple(os.path.realpath(root) + os.sep for root in roots)


class StaleCode(Exception):
    """The task was planned from other code than this process has loaded. ``key`` names that
    other code (a job snapshot id, a code version), so a reload is tried once per key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


class SourceFiles:
    """The source files of the code this process imported (every module outside the standard
    library and installed packages, and the data files of their packages), with the state they
    were loaded in: ``changed()`` says whether one was edited since."""

    def __init__(self) -> None:
        self._stats: dict[str, tuple[int, int]] = {}
        self._roots = _library_roots()
        self._packages: set[Path] = set()

    def add_loaded_code(self) -> None:
        """Take in the modules imported since the last call, and the data files of their
        packages (a defs folder's components are ``defs.yaml`` files, read at build time)."""
        found: list[str] = []
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if not path or not path.endswith(".py"):
                continue
            real = os.path.realpath(path)
            if real in self._stats or real.startswith(self._roots):
                continue
            found.append(real)
        packages = {_package_root(Path(path)) for path in found}
        for path in sorted(found):
            self._track(path)
        for package in sorted(packages - self._packages):
            self._packages.add(package)
            for path in _tree_files(package):
                if path.suffix in _DATA_SUFFIXES:
                    self._track(str(path.resolve()))

    def _track(self, path: str) -> None:
        with contextlib.suppress(OSError):
            stat = os.stat(path)
            self._stats[path] = (stat.st_mtime_ns, stat.st_size)

    @property
    def paths(self) -> list[str]:
        return list(self._stats)

    def changed(self) -> str | None:
        """The first tracked file edited, replaced or removed since it was loaded, if any."""
        for path, (mtime, size) in self._stats.items():
            try:
                stat = os.stat(path)
            except OSError:
                return path
            if (stat.st_mtime_ns, stat.st_size) != (mtime, size):
                return path
        return None


def _tree_files(root: Path) -> list[Path]:
    """The source and data files of a package's whole tree (beside a plain module: only its
    own folder, which may be anything)."""
    walk = root.rglob if (root / "__init__.py").exists() else root.glob
    return [path for path in sorted(walk("*"))
            if (path.suffix == ".py" or path.suffix in _DATA_SUFFIXES)
            and "__pycache__" not in path.parts and path.is_file()]


_versions: dict[Path, tuple[tuple[tuple[str, int, int], ...], str]] = {}


def _tree_version(root: Path) -> str:
    """A hash of the tree's contents, hashed again only when a file's size or mtime moved."""
    files = _tree_files(root)
    signature = []
    for path in files:
        with contextlib.suppress(OSError):
            stat = path.stat()
            signature.append((str(path), stat.st_mtime_ns, stat.st_size))
    known = _versions.get(root)
    if known is not None and known[0] == tuple(signature):
        return known[1]
    digest = hashlib.blake2b(digest_size=8)
    for path in files:
        with contextlib.suppress(OSError):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0"
                          + hashlib.blake2b(path.read_bytes()).digest())
    _versions[root] = (tuple(signature), digest.hexdigest())
    return digest.hexdigest()


def code_version(pointer: object) -> str:
    """A hash of the source of the package a code pointer loads (its Python and data files):
    the same on every machine with the same code, so an orchestrator and the workers running
    its steps can tell whether they run the same code. ``""`` when the pointer names no file
    this process can find."""
    path = getattr(pointer, "python_file", None)
    if path is None and isinstance(getattr(pointer, "module", None), str):
        module = sys.modules.get(pointer.module)  # ty: ignore[unresolved-attribute]
        path = getattr(module, "__file__", None)
    if not isinstance(path, str):
        return ""
    return _tree_version(_package_root(Path(os.path.realpath(path))))


_warmed = False


def prepare_fork() -> None:
    """What a zygote keeps ready for the next task it forks: the S3 clients of
    :mod:`dagster_taskiq.s3` (when the code loaded uses it; built again when too old)."""
    s3 = sys.modules.get("dagster_taskiq.s3")
    if s3 is not None:
        with contextlib.suppress(Exception):  # a warm-up only: a step builds its own then
            s3.refresh()


def _remember(cls: type, name: str, key: Callable[..., Hashable]) -> None:
    """Memoize ``cls.name`` across instances by ``key(self, *args)`` (calls with keyword
    arguments, which botocore does not make, are passed through); its results must be
    read-only to their callers."""
    original = getattr(cls, name)
    if getattr(original, "_dagster_taskiq_remembered", False):
        return
    results: dict[Hashable, Any] = {}

    @functools.wraps(original)
    def remembered(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            return original(self, *args, **kwargs)
        at = key(self, *args)
        if at not in results:
            results[at] = original(self, *args)
        return results[at]

    remembered._dagster_taskiq_remembered = True  # type: ignore[attr-defined]
    setattr(cls, name, remembered)


def _share_alias_names(hooks: Any) -> None:
    """botocore's ``EventAliaser`` (every session has one, every client a copy) keeps the
    translation of each event name it sees in a dict of its own, so every new session and
    client translates the same ~150 handler names again (~5 ms per session). The translation
    is a pure function of the name and the alias table: aliasers with the same table share one
    dict (a few known tables; any other keeps its own)."""
    original = hooks.EventAliaser.__init__
    if getattr(original, "_dagster_taskiq_remembered", False):
        return
    shared: dict[tuple[tuple[Any, Any], ...], dict[str, str]] = {}

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        table = getattr(self, "_event_aliases", None)
        cache = getattr(self, "_alias_name_cache", None)
        if not isinstance(table, dict) or not isinstance(cache, dict) or cache:
            return
        try:
            key = tuple(table.items())
            if key in shared or len(shared) < 8:
                self._alias_name_cache = shared.setdefault(key, {})
        except TypeError:  # an unhashable table: keep the aliaser's own dict
            pass

    init._dagster_taskiq_remembered = True  # type: ignore[attr-defined]
    hooks.EventAliaser.__init__ = init


def _remember_accepts_kwargs(hooks: Any) -> None:
    """botocore checks that every handler it registers takes ``**kwargs`` with
    ``inspect.getfullargspec`` (~150 handlers per session, ~2 ms). For a plain function (or a
    method of one) the answer is fixed by its code object: keep it per function (weakly, so
    functions made on the fly are not kept alive), checked against the code object it was
    computed for; any other callable is asked every time, as before."""
    original = hooks.accepts_kwargs
    if getattr(original, "_dagster_taskiq_remembered", False):
        return
    import types
    import weakref

    known: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()

    @functools.wraps(original)
    def accepts_kwargs(func: Any) -> Any:
        function = func.__func__ if isinstance(func, types.MethodType) else func
        if type(function) is not types.FunctionType or hasattr(function, "__signature__"):
            return original(func)
        hit = known.get(function)
        if hit is not None and hit[0] is function.__code__:
            return hit[1]
        result = original(func)
        known[function] = (function.__code__, result)
        return result

    accepts_kwargs._dagster_taskiq_remembered = True  # type: ignore[attr-defined]
    hooks.accepts_kwargs = accepts_kwargs


def warm_libraries() -> None:
    """Pay once, in the zygote, what a library makes every forked step pay again.

    botocore (the S3 IO manager and compute logs) re-reads its data directories and parses its
    service JSON for every new session, i.e. in every step (~60 ms for S3), and builds its
    first client lazily (~60 ms more): keep what it found and parsed (read-only to botocore, as
    its own per-session caches already treat it) and build one client here. Each new session
    also translates and checks the same ~150 event handlers again: keep those answers too
    (pure functions of the names and functions, see below), which halves what a step's
    session costs (~8 -> ~3 ms of CPU).

    Only data is kept: no session, client, credentials or connection made here is used by a
    step (each builds its own, so credentials are resolved, and refreshed, as without a
    zygote), and building a client opens no socket and starts no thread."""
    global _warmed  # once per process
    if _warmed or "botocore" not in sys.modules:
        return
    _warmed = True
    try:
        import boto3
        from botocore import hooks, loaders
    except ImportError:
        return
    # What botocore reads from its data directories does not change while a zygote lives: the
    # parsed JSON, and which services and API versions are there (a walk of ~400 folders,
    # three times per client).
    _remember(loaders.JSONFileLoader, "load_file", lambda _self, *args: args)
    for method in ("list_available_services", "list_api_versions"):
        _remember(loaders.Loader, method, lambda self, *args: (tuple(self.search_paths), *args))
    _share_alias_names(hooks)
    _remember_accepts_kwargs(hooks)
    with contextlib.suppress(Exception):  # a warm-up only: whatever fails here fails later too
        boto3.session.Session().resource(
            "s3", region_name="us-east-1", aws_access_key_id="warm-up",
            aws_secret_access_key="warm-up")
