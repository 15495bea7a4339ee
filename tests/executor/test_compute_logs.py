"""Compute logs on workers: captured to the instance's files as Dagster does, mirrored to the
worker's output by a thread of the step's process instead of ``tail`` and watcher processes."""

from __future__ import annotations

import os
import threading

import pytest
from dagster import DagsterEventType

from dagster_taskiq.log_mirror import tail_on_thread
from tests.conftest import wait_for
from tests.executor.conftest import execute_test_job, run_config


def test_step_output_is_captured_and_mirrored_without_helper_processes(
    start_worker, instance, broker_url, io_dir
):
    worker = start_worker()
    with execute_test_job("chatty_job", instance, run_config(io_dir, broker_url)) as result:
        assert result.success
        assert result.output_for_node("chatty") == 0  # no tail, no watcher
        run_id = result.run_id
    captured = instance.all_logs(run_id, of_type=DagsterEventType.LOGS_CAPTURED)
    assert len(captured) == 1
    file_key = captured[0].dagster_event.logs_captured_data.file_key
    manager = instance.compute_log_manager
    log_key = manager.build_log_key_for_run(run_id, file_key)
    assert manager.is_capture_complete(log_key)
    data = manager.get_log_data(log_key)
    stdout, stderr = data.stdout.decode(), data.stderr.decode()
    for line in ("chatty-out-0", "chatty-out-2", "chatty-subprocess", "x" * 200_000,
                 "chatty-last"):
        assert line in stdout
    assert "chatty-err-0" in stderr and "chatty-out-0" not in stderr
    # The worker's own output carries the same lines, the last one included. The worker
    # answers as soon as the step's process has sent its result; that process copies the last
    # of its output on its way out, moments later.
    lines = ("chatty-out-0", "chatty-err-0", "chatty-subprocess", "x" * 200_000, "chatty-last")
    wait_for(lambda: all(line in worker.output() for line in lines), 10,
             "every line in the worker's output")


def test_tail_on_thread_copies_everything_written_until_exit(tmp_path):
    path = tmp_path / "captured.out"
    path.write_bytes(b"")
    read_fd, write_fd = os.pipe()
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_fd, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with (open(write_fd, "wb", buffering=0) as stream, tail_on_thread(str(path), stream),
          open(path, "ab", buffering=0) as out):
        for i in range(1000):
            out.write(f"line {i}\n".encode())
        out.write(b"y" * 300_000 + b"\n")
        out.write(b"the end\n")  # written just before the context exits
    reader.join(10)
    os.close(read_fd)
    expected = b"".join(f"line {i}\n".encode() for i in range(1000)) + b"y" * 300_000 + \
        b"\nthe end\n"
    assert bytes(received) == expected


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_tail_on_thread_stops_quietly_when_the_destination_closes(tmp_path):
    path = tmp_path / "captured.out"
    path.write_bytes(b"")
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # nobody reads the worker's output any more
    with (open(write_fd, "wb", buffering=0) as stream, tail_on_thread(str(path), stream),
          open(path, "ab", buffering=0) as out):
        out.write(b"still captured\n")
    assert path.read_bytes() == b"still captured\n"
