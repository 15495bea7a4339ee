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

A step's child may serve further steps of the same run (``max_steps_per_child`` > 1; see
:class:`_Reusable`): once it has sent a step's reply, and the worker has read it and says the
child was not signalled, it waits, idle, for the zygote to hand it the next step of that run
(its request and its two descriptors, over a socket pair made before the fork), up to
``max_steps_per_child`` steps and ``CHILD_IDLE_SECONDS`` idle. It prepares and runs that step
itself, its pages already copied and its connections open; anything unusual (the code or the
stop flag changed, the step cannot be prepared there) and it declines, and the zygote forks as
for any other task.
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
CHILD_IDLE_SECONDS = 3.0  # an idle reusable child no step of its run was handed to ends then
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


class _Reusable:
    """A step's child that may serve more steps of its run (its ``key``, from the worker). It
    is idle, ready for another step, once the worker has read its reply and says it never
    signalled it: the child is then past its reply, and reads the next step as soon as it is
    there (a child that ends instead is seen, and the step it was handed forks as usual)."""

    def __init__(self, pid: int, sock: socket.socket, key: str) -> None:
        self.pid = pid
        self.sock = sock
        self.key = key
        self.steps = 1
        self.buffer = b""
        self.idle_since: float | None = None  # idle (in the pool) since, monotonic
        self.pending: tuple[dict[str, Any], int, int] | None = None  # handed, not yet taken


class Zygote:
    def __init__(self, control: socket.socket, worker: int, max_steps_per_child: int = 1
                 ) -> None:
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
        self.max_steps_per_child = max_steps_per_child
        self.reusable: dict[int, _Reusable] = {}  # by pid
        self.by_sock: dict[socket.socket, _Reusable] = {}  # by the zygote's end of its socket
        self.open = True

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
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the poll below
        while self.open or self.children:
            # poll, not select: a zygote with many idle children may hold descriptors >= 1024.
            poller = select.poll()
            poller.register(self.wakeup_r, select.POLLIN)
            for sock in self.by_sock:
                poller.register(sock, select.POLLIN)
            if self.open:
                poller.register(self.control, select.POLLIN)
            readable = {fd for fd, _ in poller.poll(self._timeout() * 1000)}
            if self.wakeup_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wakeup_r, 4096)
            for reusable in list(self.by_sock.values()):
                # Not one retired meanwhile (its descriptor number may be reused).
                if reusable.sock.fileno() in readable and reusable.pid in self.reusable:
                    self._from_child(reusable)
            self._reap()
            if self.open and self.control.fileno() in readable:
                self.open = self._receive()
                if not self.open:  # draining: no child takes another step
                    for reusable in list(self.reusable.values()):
                        if reusable.pending is None:  # else it says first (see _retire)
                            self._retire(reusable)
            self._expire()
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
            reusable = self.reusable.get(pid)
            if reusable is not None:
                self._from_child(reusable, settle=True)  # whether it took a step before it died
                self._retire(reusable)
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
            elif request["op"] == "done":
                self._worker_done(request["pid"], request.get("reuse", False))
            else:
                self._task(request, self.fds.pop(0), self.fds.pop(0))
        return True

    def _warm(self) -> list[str]:
        from dagster._serdes import serialize_value

        from dagster_taskiq.worker.code import loaded_repositories

        return [serialize_value(repository) for repository in loaded_repositories()]

    def _task(self, request: dict[str, Any], write_fd: int, page_fd: int) -> None:
        task_id = request["id"]
        page = mmap.mmap(page_fd, PAGE_SIZE)
        handed = False
        try:
            changed = None if request.get("stale_ok") else self.files.changed()
            if changed is not None:
                self.send({"id": task_id, "stale": f"file:{changed}",
                           "reason": f"{changed} changed since this worker loaded it"})
                return
            if read_stop(page) != NOT_STOPPED:
                self.send({"id": task_id, "stopped": read_stop(page).decode()})
                return
            key = self._reuse_key(request)
            if key is not None and self._hand(key, request, write_fd, page_fd):
                handed = True  # both descriptors stay open until the child has taken them
                return
            os.close(page_fd)
            page_fd = -1
            self._fork_task(request, write_fd, page, key)
        finally:
            page.close()
            if not handed:
                os.close(write_fd)
                if page_fd >= 0:
                    os.close(page_fd)

    def _fork_task(self, request: dict[str, Any], write_fd: int, page: mmap.mmap,
                   key: str | None) -> None:
        from dagster_taskiq.worker.code import StaleCode, prepare_fork
        from dagster_taskiq.worker.outcome import error_outcome

        task_id = request["id"]
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
        ours = theirs = None
        if key is not None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._freeze()
        pid = os.fork()
        if pid == 0:
            if ours is not None:
                ours.close()
            self._child(body, write_fd, page, request.get("kind") == "step", theirs)
        self.children.add(pid)
        # Its own process group, before anyone learns its pid and may signal it.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        if ours is not None and theirs is not None and key is not None:
            theirs.close()
            reusable = self.reusable[pid] = _Reusable(pid, ours, key)
            self.by_sock[ours] = reusable
            self.send({"id": task_id, "pid": pid, "reusable": True})
        else:
            self.send({"id": task_id, "pid": pid})

    # -- children that serve several steps of one run ---------------------------------------

    def _reuse_key(self, request: dict[str, Any]) -> str | None:
        key = request.get("reuse")
        if (self.max_steps_per_child > 1 and self.open and isinstance(key, str)
                and request.get("kind") == "step" and not request.get("stale_ok")):
            return key
        return None

    def _hand(self, key: str, request: dict[str, Any], write_fd: int, page_fd: int) -> bool:
        """Give the task to an idle child of the same run, if there is one."""
        for reusable in list(self.reusable.values()):
            if reusable.key != key or reusable.idle_since is None:
                continue
            reusable.idle_since = None
            data = json.dumps({"task": request}).encode() + b"\n"
            try:
                socket.send_fds(reusable.sock, [data], [write_fd, page_fd])
            except OSError:  # it has just ended
                self._retire(reusable)
                continue
            reusable.pending = (request, write_fd, page_fd)
            return True
        return False

    def _from_child(self, reusable: _Reusable, settle: bool = False) -> None:
        """Read what the child said; ``settle``: it has died, read all it said first."""
        if settle:
            data = b""
            with contextlib.suppress(OSError):
                while chunk := reusable.sock.recv(4096, socket.MSG_DONTWAIT):
                    data += chunk
        else:
            try:
                data = reusable.sock.recv(4096)
            except OSError:
                data = b""
            if not data:  # it ended (or declined and left)
                self._retire(reusable)
                return
        reusable.buffer += data
        while b"\n" in reusable.buffer and reusable.pid in self.reusable:
            line, reusable.buffer = reusable.buffer.split(b"\n", 1)
            message = json.loads(line)
            if "accepted" in message and reusable.pending is not None:
                request, write_fd, page_fd = reusable.pending
                reusable.pending = None
                os.close(write_fd)
                os.close(page_fd)
                reusable.steps += 1
                self.send({"id": request["id"], "pid": reusable.pid, "reusable": True,
                           "reused": reusable.steps})
            else:  # declined: the zygote prepares it and forks, as for any task
                self._retire(reusable)

    def _worker_done(self, pid: int, reuse: bool) -> None:
        """The worker has read the reply of the step child ``pid`` ran; ``reuse``: it never
        signalled it (a child stopped or killed, even too late, takes no other step)."""
        reusable = self.reusable.get(pid)
        if reusable is None:
            return
        if not reuse or reusable.steps >= self.max_steps_per_child or not self.open:
            self._retire(reusable)
            return
        reusable.idle_since = time.monotonic()

    def _retire(self, reusable: _Reusable) -> None:
        """No more steps for this child: closing its socket ends it once it is idle. A task
        handed to it and not taken goes the usual way. Called with a task pending only once
        the child cannot take it any more (it declined, or its socket or process ended with no
        "accepted" read): it runs a step once it has said so, so the socket of a child that
        may still take its task is never closed (that could run the task twice)."""
        self.reusable.pop(reusable.pid, None)
        self.by_sock.pop(reusable.sock, None)
        with contextlib.suppress(OSError):
            reusable.sock.close()
        if reusable.pending is not None:
            request, write_fd, page_fd = reusable.pending
            reusable.pending = None
            self._task(request, write_fd, page_fd)

    def _expire(self) -> None:
        now = time.monotonic()
        for reusable in list(self.reusable.values()):
            if reusable.idle_since is not None \
                    and now - reusable.idle_since >= CHILD_IDLE_SECONDS:
                self._retire(reusable)

    def _timeout(self) -> float:
        timeout = 1.0
        for reusable in self.reusable.values():
            if reusable.idle_since is not None:
                timeout = min(timeout, max(0.0, reusable.idle_since + CHILD_IDLE_SECONDS
                                           - time.monotonic()) + 0.01)
        return timeout

    # -- a task's child ----------------------------------------------------------------------

    def _child(self, body: Callable[[], dict[str, Any]], write_fd: int, page: mmap.mmap,
               fenced: bool, channel: socket.socket | None = None) -> None:
        code = 0
        try:
            self.control.close()
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
            # Nothing of any other task: other children's sockets, descriptors handed to them
            # and not taken yet, and those of tasks still queued in this zygote.
            for other in self.reusable.values():
                other.sock.close()
                if other.pending is not None:
                    os.close(other.pending[1])
                    os.close(other.pending[2])
            for fd in self.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            die_with_parent(self.pid)
            os.setpgid(0, 0)  # own process group, so a kill also reaches what the task starts
            fence = _Fence()
            while True:
                _run_step(body, write_fd, page, fenced, fence)
                if channel is None:
                    break
                following = _next_step(channel)
                if following is None:
                    break
                body, write_fd, page = following
            from dagster_taskiq.connections import release_connections

            release_connections()  # closing a database can checkpoint it: after the reply
        except BaseException:
            code = 70
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def _run_step(body: Callable[[], dict[str, Any]], write_fd: int, page: mmap.mmap,
              fenced: bool, fence: _Fence) -> None:
    """Run one task in this child and send its reply (closing its pipe: EOF for the worker
    now, not after this process is torn down); then forget its control page."""
    stop = read_stop(page)
    if stop == RELEASED:
        os._exit(0)  # handed back meanwhile: no result, another worker runs it
    if stop == CANCELLED:
        outcome: dict[str, Any] = {"events": [], "error": None, "crashed": False,
                                   "skipped": "canceling"}
    else:
        if fenced and read_deadline(page) != float("inf"):
            fence.watch(page)
        try:
            outcome = body()
        except BaseException:
            from dagster_taskiq.worker.outcome import error_outcome

            outcome = error_outcome()
        finally:
            fence.watch(None)
    payload = memoryview(json.dumps(outcome).encode())
    while payload:
        payload = payload[os.write(write_fd, payload):]
    os.close(write_fd)
    page.close()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()


_Step = tuple[Callable[[], dict[str, Any]], int, mmap.mmap]  # its body, result pipe, page


def _next_step(channel: socket.socket) -> _Step | None:
    """Idle: wait for another step of this run from the zygote (None: end instead). The step
    is prepared here; anything unusual and it is declined, for the zygote to handle the usual
    way."""
    try:
        data, fds, _, _ = socket.recv_fds(channel, 1 << 16, 2)
        while data and not data.endswith(b"\n"):
            more = channel.recv(1 << 16)
            if not more:
                data = b""
            data += more
    except OSError:
        return None
    if not data or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        return None
    request = json.loads(data)["task"]
    write_fd, page_fd = fds
    page = mmap.mmap(page_fd, PAGE_SIZE)
    os.close(page_fd)
    body = None
    s3 = sys.modules.get("dagster_taskiq.s3")
    if s3 is not None:
        with contextlib.suppress(Exception):
            s3.reissue()
    if read_stop(page) == NOT_STOPPED:
        try:
            body = resolve(request["entry"])(**request["kwargs"])
        except BaseException:  # stale code, or any error: the zygote finds and reports it
            body = None
    if body is None or read_stop(page) != NOT_STOPPED:
        os.close(write_fd)
        page.close()
        with contextlib.suppress(OSError):
            channel.sendall(b'{"declined": true}\n')
        return None
    channel.sendall(b'{"accepted": true}\n')
    # What the last step may have changed of how this process takes signals.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return body, write_fd, page


class _Fence:
    """Stop this child's whole process group once the fence deadline of the step it runs
    passes without renewal: the worker could not renew the lease (or is frozen), so another
    worker may take the task soon, and this copy must be gone first. Idle, it watches
    nothing."""

    def __init__(self) -> None:
        self.page: mmap.mmap | None = None
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def watch(self, page: mmap.mmap | None) -> None:
        with self.lock:
            self.page = page
        if page is not None and self.thread is None:
            self.thread = threading.Thread(target=self._run, daemon=True,
                                           name="dagster-taskiq-fence")
            self.thread.start()

    def _run(self) -> None:
        while True:
            with self.lock:
                passed = self.page is not None and time.monotonic() > read_deadline(self.page)
            if passed:
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
    zygote = Zygote(control, config["worker"], config.get("max_steps_per_child", 1))
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
