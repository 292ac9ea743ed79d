"""Background work that keeps the main loop fed, shared by extract, prepare and train.

* :class:`Prefetcher` runs a function over items in worker threads and yields the results in
  order, at most ``depth`` items ahead (reading patch chunks, rendering patches, assembling
  training batches).
* :class:`ChunkWriter` hands items to writer threads through a bounded queue (compressing and
  storing chunks while the next batch computes).

Either re-raises the first failure of a worker in the calling thread, and stops its workers when
the caller stops early.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


class Prefetcher:
    """``fn(item)`` for each item, computed ahead in ``workers`` threads, yielded in order."""

    def __init__(self, fn: Callable, items: Iterable, workers: int = 1, depth: int = 2, name: str = "featcache"):
        self.fn = fn
        self.items = iter(items)
        self.depth = max(1, depth)
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=f"{name}-prefetch")
        self.pending: deque = deque()

    def _fill(self) -> None:
        while len(self.pending) < self.depth:
            item = next(self.items, _END)
            if item is _END:
                return
            self.pending.append(self.pool.submit(self.fn, item))

    def __iter__(self) -> Iterator:
        try:
            self._fill()
            while self.pending:
                result = self.pending.popleft().result()
                self._fill()
                yield result
        finally:
            self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ChunkWriter:
    """``fn(item)`` in ``threads`` background threads; :meth:`put` blocks while ``depth`` items wait."""

    def __init__(self, fn: Callable, threads: int = 1, depth: int = 2, name: str = "featcache-writer"):
        self.fn = fn
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.failure: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(max(1, threads))
        ]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        while (item := self.queue.get()) is not _END:
            if self.failure:
                continue  # drain, so that put() never blocks for good
            try:
                self.fn(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self.failure.append(exc)

    def check(self) -> None:
        if self.failure:
            raise self.failure[0]

    def put(self, item) -> None:
        while True:
            self.check()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _stop(self) -> None:
        for _ in self.threads:
            while any(t.is_alive() for t in self.threads):
                try:
                    self.queue.put(_END, timeout=0.5)
                    break
                except queue.Full:
                    continue
        for t in self.threads:
            t.join()

    def close(self) -> None:
        """Wait until every item is written; re-raise the first failure."""
        self._stop()
        self.check()

    def abort(self) -> None:
        self.failure.append(RuntimeError("stopped"))  # queued items are dropped, not written
        self._stop()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


_END = object()
