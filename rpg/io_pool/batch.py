"""Batcher: many greenlets' small blocking calls, carried to a lane in bulk.

Each ``call(*args)`` waits for its own result, but calls that arrive while a batch is in flight
are gathered and handed to the lane as one task (up to ``max_batch``), so a thousand spawns cost
tens of thread hand-offs instead of a thousand. Up to ``parallel`` batches run at once; with
``gather_s``, a batch that is not full waits that long for more calls before it goes.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import gevent
from gevent.event import AsyncResult

from rpg.io_pool.lane import KEEP_WAIT_S, Lane
from rpg.log import get_logger


def _apply_each(fn: Callable[..., Any], calls: list[tuple]) -> list[tuple[bool, Any]]:
    # Runs on a lane thread: one failure does not spoil the batch.
    out: list[tuple[bool, Any]] = []
    for args in calls:
        try:
            out.append((True, fn(*args)))
        except Exception as exc:
            out.append((False, exc))
    return out


class Batcher:
    def __init__(self, lane: Lane, fn: Callable[..., Any], max_batch: int = 64,
                 parallel: int = 2, timeout: float | None = None, gather_s: float = 0.0) -> None:
        self.lane = lane
        self.gather_s = gather_s  # a batch waits this long for company (a hand-off is ~40 us)
        self.fn = fn
        self.max_batch = max_batch
        self.parallel = parallel
        self.timeout = timeout
        self._pending: dict[AsyncResult, tuple] = {}  # insertion-ordered: first come, first run
        self._active = 0
        self.batches = 0
        self.calls = 0

    def submit(self, *args: Any) -> AsyncResult:
        """Queue a call; the AsyncResult gets its value or exception."""
        result = AsyncResult()
        self._pending[result] = args
        if self._active < self.parallel:
            self._active += 1
            gevent.spawn(self._drain)
        return result

    def withdraw(self, result: AsyncResult) -> bool:
        """Take back a call that no batch has picked up yet. True if it will never run."""
        return self._pending.pop(result, None) is not None

    def call(self, *args: Any, keep: Callable[[Any], Any] | None = None) -> Any:
        """``fn(*args)`` on the lane, batched with whatever else is waiting; blocks the caller.

        A caller killed while waiting takes its call back if no batch has picked it up yet;
        otherwise the call is abandoned, or, with ``keep``, waited for and its result handed
        to ``keep`` (as ``Lane.run``'s ``keep``).
        """
        pending = self.submit(*args)
        try:
            return pending.get()
        except BaseException:
            if not self.withdraw(pending) and keep is not None:
                try:
                    value = pending.get(timeout=KEEP_WAIT_S)
                except BaseException as exc:
                    get_logger("io_pool").error("batch_result_not_kept", error=repr(exc))
                else:
                    keep(value)
            raise

    def _drain(self) -> None:
        try:
            while self._pending:
                if self.gather_s and len(self._pending) < self.max_batch:
                    gevent.sleep(self.gather_s)
                    if not self._pending:  # its callers were killed and took their calls back
                        break
                batch = [(args, res) for res, args in
                         itertools.islice(self._pending.items(), self.max_batch)]
                for _, res in batch:
                    del self._pending[res]
                self.batches += 1
                self.calls += len(batch)
                try:
                    results = self.lane.run(_apply_each, self.fn, [a for a, _ in batch],
                                            timeout=self.timeout)
                except BaseException as exc:  # lane full, closed, timed out, or we are killed
                    for _, res in batch:
                        res.set_exception(exc if isinstance(exc, Exception)
                                          else RuntimeError(f"batch aborted: {exc!r}"))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, res), (ok, value) in zip(batch, results, strict=True):
                    if ok:
                        res.set(value)
                    else:
                        res.set_exception(value)
        finally:
            self._active -= 1
