"""The zygote: the clean, warm process every task of a worker is forked from.

A worker starts one (``python -m dagster_taskiq.worker.zygote``), with nothing of the worker in
it: no event loop, no Redis connections, no threads of ours. It imports Dagster and the user's
code, then waits on one Unix socket. For each task the worker sends what to run and two file
descriptors: the write end of the task's result pipe and the task's control page (a shared page
holding its lease-fence deadline and a stop flag). The zygote prepares the task (instance, code,
run: built once per zygote, see :mod:`~dagster_taskiq.worker.code`), forks, and closes both
descriptors, so each child inherits its own pipe and nothing of any other task. It reports each
child's pid and, when it exits, its wait status.

One zygote holds one version of the code. When a tracked source file changes, or a task was
planned from other code, the zygote says so instead of running it, and the worker starts a new
one (the old one lives on until its last child exits, then ends). Wire format, both ways: one
JSON object per line.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import json
import logging
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("dagster_taskiq.zygote")

# The control page of a task: its fence deadline (monotonic seconds, a double; +inf: none)
# then one byte, the stop flag.
PAGE_SIZE = mmap.PAGESIZE
STOP_OFFSET = 8
NOT_STOPPED, RELEASED, CANCELLED = b"\0", b"r", b"c"
FENCE_WATCH_SECONDS = 0.1
GC_EVERY_FORKS = 200
_PR_SET_PDEATHSIG = 1


def read_deadline(page: mmap.mmap) -> float:
    return struct.unpack_from("d", page, 0)[0]


def write_deadline(page: mmap.mmap, deadline: float) -> None:
    struct.pack_into("d", page, 0, deadline)


def read_stop(page: mmap.mmap) -> bytes:
    return page[STOP_OFFSET:STOP_OFFSET + 1]


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)  # loaded once, by the zygote, for every child


def die_with_parent(parent: int) -> None:
    """Be killed when ``parent`` dies (SIGKILL, OOM): tasks of a dead worker must not go on
    beside the copies other workers take once their leases expire."""
    if sys.platform.startswith("linux"):
        _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def resolve(entry: str) -> Callable[..., Callable[[], dict[str, Any]]]:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


class Zygote:
    def __init__(self, control: socket.socket, worker: int) -> None:
        self.control = control
        self.worker = worker
        self.children: set[int] = set()
        self.buffer = b""
        self.fds: list[int] = []
        self.wakeup_r, self.wakeup_w = os.pipe()
        self.files: Any = None
        self.modules_seen = 0
        self.pid = os.getpid()
        self.forks = 0

    # -- start -----------------------------------------------------------------------------

    def load(self, includes: list[str], warm: list[str]) -> None:
        from dagster._serdes import deserialize_value

        from dagster_taskiq import log_mirror
        from dagster_taskiq.worker import code, steps

        code.install_definitions_cache()
        steps.preload()
        for module in includes:
            importlib.import_module(module)
        if not log_mirror.install():
            logger.warning("Compute logs are mirrored by Dagster's tail processes (unexpected "
                           "Dagster version): steps start more slowly.")
        for serialized in warm:  # what the zygote this one replaces had built
            try:
                deserialize_value(serialized).get_definition()
            except Exception:
                logger.exception("Could not build the definitions loaded before; they will "
                                 "be loaded by the first task that needs them.")
        self.files = code.SourceFiles()
        self._track()
        gc.collect()
        gc.freeze()

    def _track(self) -> None:
        """Take in the code imported since (a code location loaded by its first task)."""
        if len(sys.modules) != self.modules_seen:
            from dagster_taskiq.worker.code import warm_libraries

            warm_libraries()
            self.files.add_loaded_code()
            self.modules_seen = len(sys.modules)

    def _freeze(self) -> None:
        """Move every object to the permanent generation before a fork: the child's garbage
        collector then never walks (and so never copies) the heap it inherited, which cost a
        forked step tens of milliseconds (more with large user code). What the zygote itself
        leaves behind is collected now and then."""
        self.forks += 1
        if self.forks % GC_EVERY_FORKS == 0:
            gc.unfreeze()
            gc.collect()
        gc.freeze()

    def send(self, message: dict[str, Any]) -> None:
        self.control.sendall(json.dumps(message).encode() + b"\n")

    # -- serve -----------------------------------------------------------------------------

    def serve(self) -> None:
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select below
        open_ = True
        while open_ or self.children:
            readable, _, _ = select.select(
                [self.control, self.wakeup_r] if open_ else [self.wakeup_r], [], [], 1.0)
            if self.wakeup_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wakeup_r, 4096)
            self._reap()
            if open_ and self.control in readable:
                open_ = self._receive()
        self._reap()

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send({"exit": pid, "status": status})

    def _receive(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.control, 1 << 16, 8)
        except OSError:
            data, fds = b"", []
        if not data:
            return False  # the worker is done with this zygote: end once the children have
        self.buffer += data
        self.fds.extend(fds)
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            request = json.loads(line)
            if request["op"] == "check":
                self.send({"id": request["id"], "changed": self.files.changed(),
                           "warm": self._warm()})
            else:
                self._task(request, self.fds.pop(0), self.fds.pop(0))
        return True

    def _warm(self) -> list[str]:
        from dagster._serdes import serialize_value

        from dagster_taskiq.worker.code import loaded_repositories

        return [serialize_value(repository) for repository in loaded_repositories()]

    def _task(self, request: dict[str, Any], write_fd: int, page_fd: int) -> None:
        from dagster_taskiq.worker.code import StaleCode, prepare_fork
        from dagster_taskiq.worker.outcome import error_outcome

        task_id = request["id"]
        page = mmap.mmap(page_fd, PAGE_SIZE)
        os.close(page_fd)
        try:
            changed = None if request.get("stale_ok") else self.files.changed()
            if changed is not None:
                self.send({"id": task_id, "stale": f"file:{changed}",
                           "reason": f"{changed} changed since this worker loaded it"})
                return
            if read_stop(page) != NOT_STOPPED:
                self.send({"id": task_id, "stopped": read_stop(page).decode()})
                return
            kwargs = request["kwargs"]
            if request.get("stale_ok"):
                kwargs = {**kwargs, "stale_ok": True}
            try:
                body = resolve(request["entry"])(**kwargs)
            except StaleCode as stale:
                self.send({"id": task_id, "stale": stale.key, "reason": str(stale)})
                return
            except Exception:
                self.send({"id": task_id, "outcome": error_outcome(), "unprepared": True})
                return
            self._track()
            prepare_fork()
            if read_stop(page) != NOT_STOPPED:  # stopped while it was prepared: never fork
                self.send({"id": task_id, "stopped": read_stop(page).decode()})
                return
            self._freeze()
            pid = os.fork()
            if pid == 0:
                self._child(body, write_fd, page, request.get("kind") == "step")
            self.children.add(pid)
            # Its own process group, before anyone learns its pid and may signal it.
            with contextlib.suppress(OSError):
                os.setpgid(pid, pid)
            self.send({"id": task_id, "pid": pid})
        finally:
            os.close(write_fd)
            page.close()

    # -- a task's child ----------------------------------------------------------------------

    def _child(self, body: Callable[[], dict[str, Any]], write_fd: int, page: mmap.mmap,
               fenced: bool) -> None:
        code = 0
        try:
            self.control.close()
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            die_with_parent(self.pid)
            os.setpgid(0, 0)  # own process group, so a kill also reaches what the task starts
            stop = read_stop(page)
            if stop == RELEASED:
                os._exit(0)  # handed back meanwhile: no result, another worker runs it
            if stop == CANCELLED:
                outcome: dict[str, Any] = {"events": [], "error": None, "crashed": False,
                                           "skipped": "canceling"}
            else:
                if fenced and read_deadline(page) != float("inf"):
                    threading.Thread(target=_watch_fence, args=(page,), daemon=True,
                                     name="dagster-taskiq-fence").start()
                try:
                    outcome = body()
                except BaseException:
                    from dagster_taskiq.worker.outcome import error_outcome

                    outcome = error_outcome()
            payload = memoryview(json.dumps(outcome).encode())
            while payload:
                payload = payload[os.write(write_fd, payload):]
            os.close(write_fd)  # EOF for the worker now, not after this process is torn down
            from dagster_taskiq.connections import release_connections

            release_connections()  # closing a database can checkpoint it: after the reply
        except BaseException:
            code = 70
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def _watch_fence(page: mmap.mmap) -> None:
    """Stop this task's whole process group once its fence deadline passes without renewal:
    the worker could not renew the lease (or is frozen), so another worker may take the task
    soon, and this copy must be gone first."""
    while True:
        if time.monotonic() > read_deadline(page):
            os.write(2, f"Task process {os.getpid()}: its lease was not renewed in time; "
                        "stopping (the task goes back to its queue).\n".encode())
            os.killpg(0, signal.SIGKILL)
        time.sleep(FENCE_WATCH_SECONDS)


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    sys.path[:] = config["sys_path"]  # the worker's, whatever started it
    logging.basicConfig(level=config["loglevel"],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its import-time chatter
    die_with_parent(config["worker"])
    # The worker decides when tasks stop; Ctrl-C in a terminal reaches the whole group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control = socket.socket(fileno=config["fd"])
    control.setblocking(True)
    zygote = Zygote(control, config["worker"])
    try:
        zygote.load(config["includes"], config["warm"])
    except BaseException:
        import traceback

        zygote.send({"failed": traceback.format_exc()})
        return 1
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    zygote.send({"ready": os.getpid(), "files": len(zygote.files.paths), "threads": threads})
    zygote.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
