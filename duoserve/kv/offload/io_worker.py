"""A background thread for the disk tier's file I/O, so that the engine loop never waits on a disk.

Jobs are plain functions; their results come back to the thread that calls `poll()` (the engine loop),
which runs each job's `on_done` there. So every index and counter of the tiers has one writer, the
engine loop, and the thread touches nothing but files and the buffers handed to it.

Reads go before writes and deletes (a request waits for them); writes and deletes keep their order
among themselves, so a delete queued after a write of the same file removes it. One thread: the file
I/O of one block is a few hundred microseconds, and a CRC of it runs in the same thread, which holds
the GIL only between chunks (zlib and file reads release it).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

URGENT, BACKGROUND = 0, 1
_STOP = (2, 0, None, None)  # sorts after every job: close() lets the queue drain first


class IOWorker:
    def __init__(self, name: str = "duoserve-kv-offload-io") -> None:
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._order = itertools.count()
        self._pending = 0  # submitted and not yet polled (written by the polling thread only)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def num_pending(self) -> int:
        return self._pending

    def submit(
        self,
        job: Callable[[], Any],
        on_done: Callable[[Any, BaseException | None], None],
        urgent: bool = False,
    ) -> None:
        """Run `job()` on the thread; `on_done(result, error)` runs in a later `poll()`."""
        self._pending += 1
        self._jobs.put((URGENT if urgent else BACKGROUND, next(self._order), job, on_done))

    def poll(self) -> int:
        """Run the callbacks of every finished job (without waiting); returns how many ran."""
        count = 0
        while True:
            try:
                on_done, result, error = self._done.get_nowait()
            except queue.Empty:
                return count
            self._pending -= 1
            count += 1
            on_done(result, error)

    def wait(self, timeout: float) -> bool:
        """Poll until every submitted job has finished and its callback ran; False if `timeout` passed."""
        return self.wait_for(lambda: self._pending == 0, timeout)

    def wait_for(self, done: Callable[[], bool], timeout: float) -> bool:
        """Poll, waiting up to `timeout` for jobs to finish, until `done()` (which their callbacks make
        true, e.g. a load's reads landed); returns done(). Callbacks of other jobs run meanwhile, as in
        poll()."""
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._pending == 0:
                return done()
            try:
                on_done, result, error = self._done.get(timeout=remaining)
            except queue.Empty:
                return done()
            self._pending -= 1
            on_done(result, error)
        return True

    def close(self, timeout: float) -> bool:
        """Finish the queued jobs (up to `timeout`) and stop the thread; False if some were left."""
        deadline = time.monotonic() + timeout
        finished = self.wait(timeout)
        self._jobs.put(_STOP)
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return finished

    def _run(self) -> None:
        while True:
            _, _, job, on_done = self._jobs.get()
            if job is None:
                return
            try:
                result, error = job(), None
            except Exception as err:  # handed back to the engine loop, which decides what it means
                result, error = None, err
            self._done.put((on_done, result, error))
