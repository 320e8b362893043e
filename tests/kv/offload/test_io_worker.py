"""The I/O thread: results come back on the polling thread, reads go before queued writes."""

from __future__ import annotations

import threading

from duoserve.kv.offload.io_worker import IOWorker
from tests.kv.offload.conftest import WAIT_S


def test_urgent_jobs_overtake_queued_ones_and_errors_come_back():
    worker = IOWorker()
    started, gate = threading.Event(), threading.Event()
    done: list[tuple[str, object, object]] = []

    def record(name):
        return lambda result, error: done.append((name, result, error))

    # The blocker holds the thread (once it runs) while the others queue.
    worker.submit(lambda: started.set() or gate.wait(WAIT_S), record("blocker"))
    assert started.wait(WAIT_S)
    worker.submit(lambda: "written", record("write"))
    worker.submit(lambda: 1 / 0, record("delete"))
    worker.submit(lambda: "read", record("read"), urgent=True)
    assert worker.poll() == 0 and done == []  # callbacks only ever run in poll()/wait()
    gate.set()
    assert worker.wait(WAIT_S) and worker.num_pending == 0
    assert [name for name, _, _ in done] == ["blocker", "read", "write", "delete"]
    assert done[1][1] == "read" and isinstance(done[3][2], ZeroDivisionError)
    assert worker.close(WAIT_S)
