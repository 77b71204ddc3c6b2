"""Lanes: named, bounded pools of real OS threads that run blocking calls for a gevent loop.

A greenlet calls ``lane.run(fn, *args, timeout=...)``; ``fn`` runs on one of the lane's native
threads, and the calling greenlet sleeps (cooperatively) until the thread is done. A call that
outlives its timeout raises ``IOTimeout`` in the caller; the thread stays stuck in ``fn`` (a
thread cannot be killed) and is counted as stuck until ``fn`` returns.

The lane is its own small thread pool, not gevent's ``ThreadPool``: that one starts, stops and
closes an async watcher, takes a semaphore and builds an ``AsyncResult`` for every call, and its
task queue is a Python ``Condition``. Here a call is a ``Waiter`` put on a native
``SimpleQueue``; a thread appends ``(waiter, outcome)`` to one deque and wakes the loop through
the lane's one async watcher, and the loop hands every outcome there to its caller in one go.
"""

from __future__ import annotations

from collections import deque
from time import monotonic, perf_counter
from typing import Any, Callable, TypeVar

import gevent
import numpy as np
from gevent.hub import Waiter

from rpg import threads as rpg_threads
from rpg.log import get_logger

T = TypeVar("T")

LATENCY_RING = 4096
KEEP_WAIT_S = 130.0  # how long a killed caller still waits for a result it must keep hold of


class IOPoolError(Exception):
    """Base class of io_pool errors."""


class IOTimeout(IOPoolError, TimeoutError):
    """A lane call did not finish within its timeout; its thread may still be stuck in it."""

    def __init__(self, lane: str, what: str, timeout: float) -> None:
        super().__init__(
            f"I/O timeout: {what} on lane {lane!r} did not finish within {timeout:g} s")
        self.lane = lane
        self.what = what
        self.timeout = timeout

    def __reduce__(self) -> tuple[Any, ...]:  # picklable: it crosses from function workers
        return (type(self), (self.lane, self.what, self.timeout))


class LaneFull(IOPoolError):
    """The lane's bounded queue is full; the call was not queued."""


class LaneDegraded(IOPoolError):
    """The lane has stuck threads and is set to fail fast; the call was not queued."""


class LaneClosed(IOPoolError):
    """The lane was closed; no more calls are accepted."""


def _name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class Lane:
    """A named pool of ``threads`` native threads with a bounded queue of ``queue_limit`` calls.

    Made anywhere; used (``run``, ``close``) from the thread of the loop it belongs to.
    """

    def __init__(
        self,
        name: str,
        threads: int = 4,
        queue_limit: int = 1024,
        stall_after: float = 5.0,
        fail_fast: bool = False,
        hub: Any = None,
    ) -> None:
        if threads < 1:
            raise ValueError(f"lane {name!r}: threads must be >= 1, got {threads}")
        if queue_limit < 0:
            raise ValueError(f"lane {name!r}: queue_limit must be >= 0, got {queue_limit}")
        self.name = name
        self.threads = threads
        self.queue_limit = queue_limit
        self.stall_after = stall_after
        self.fail_fast = fail_fast
        self._hub = hub if hub is not None else gevent.get_hub()
        self._tasks = rpg_threads.SimpleQueue()  # (waiter, fn, args, kwargs); None: exit
        self._done: deque[tuple[Waiter, tuple[bool, Any]]] = deque()  # filled by the threads
        self._wake: Any = None  # the loop's async watcher, made on the first call (its thread)
        self._wake_lock = rpg_threads.Lock()  # a thread's send against the loop's close
        self._workers: list[rpg_threads.Thread] = []
        self._waiting: set[Waiter] = set()  # calls whose callers wait (woken if the lane closes)
        # The loop thread alone counts calls accepted, finished and failed (a call its caller
        # left is counted when its outcome comes) and keeps the latency ring; a lane thread only
        # stamps its own call's start in ``_running`` (it holds the GIL the loop waits for).
        self._accepted = 0  # calls handed to the threads
        self.completed = 0  # of those, finished by a thread
        self.errors = 0  # of those, raised
        self._running: dict[int, float] = {}  # thread ident -> monotonic start of its call
        self._lat = [0.0] * LATENCY_RING  # seconds from submit to result, as callers saw them
        self._lat_n = 0
        self.timeouts = 0
        self.rejected = 0
        self._closed = False
        self._log = get_logger("io_pool", lane=name)

    # -- the call path -------------------------------------------------------------------------

    def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None,
            keep: Callable[[T], Any] | None = None, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on a lane thread; return its result or raise its error.

        If the caller is killed (GreenletExit, KeyboardInterrupt) while ``fn`` runs, the call
        is abandoned by default: its result, when it comes, is dropped. With ``keep``, the
        caller still waits (up to KEEP_WAIT_S) for the result and hands it to ``keep`` before
        the kill goes on: a process spawned in the meantime is kept hold of (to stop it), not
        left behind. (trio's ``abandon_on_cancel``.)
        """
        if self._closed:
            raise LaneClosed(f"lane {self.name!r} is closed")
        if rpg_threads.get_ident() != self._hub.thread_ident:
            raise IOPoolError(f"lane {self.name!r} belongs to the loop of another thread; "
                              f"call it from that thread's greenlets")
        if self.fail_fast and self.stuck() > 0:
            self.rejected += 1
            raise LaneDegraded(
                f"lane {self.name!r} is degraded ({self.stuck()} stuck threads) and fails fast"
            )
        outstanding = self._accepted - self.completed
        if outstanding >= self.threads + self.queue_limit:
            self.rejected += 1
            raise LaneFull(
                f"lane {self.name!r} is full: {outstanding} calls outstanding "
                f"(threads={self.threads}, queue_limit={self.queue_limit})"
            )
        if outstanding == 0:
            self._busy()  # the wake watcher keeps the loop alive while calls are out
        if outstanding >= len(self._workers) and len(self._workers) < self.threads:
            self._start_thread()
        submitted = perf_counter()
        waiter = Waiter(self._hub)
        self._tasks.put((waiter, fn, args, kwargs))
        self._accepted += 1
        waiting = self._waiting
        waiting.add(waiter)
        timer = gevent.Timeout._start_new_or_dummy(timeout) if timeout is not None else None
        try:
            ok, value = waiter.get()
        except BaseException as exc:
            if timer is not None and exc is timer:
                self.timeouts += 1
                self._lat[self._lat_n % LATENCY_RING] = perf_counter() - submitted  # a stall
                self._lat_n += 1
                self._log.warning("lane_timeout", what=_name_of(fn), timeout=timeout)
                raise IOTimeout(self.name, _name_of(fn), timeout or 0.0) from None
            if keep is not None:
                keep_result(waiter, keep, _name_of(fn), self._log)
            raise
        finally:
            waiting.discard(waiter)
            if timer is not None:
                timer.close()
        self._lat[self._lat_n % LATENCY_RING] = perf_counter() - submitted
        self._lat_n += 1
        if ok:
            return value
        raise value

    def _busy(self) -> None:
        wake = self._wake
        if wake is None:
            with self._wake_lock:
                wake = self._wake = self._hub.loop.async_()
            wake.start(self._deliver)
        wake.ref = True

    def _deliver(self) -> None:
        """On the loop: the outcomes the threads left, each to its caller (a caller that left
        has none waiting; its outcome is only counted). Its callers run their next steps
        before it returns, so it takes only what is there when it starts: calls those steps
        make are delivered on a later wake, and other greenlets get their turn between."""
        done = self._done
        for _ in range(len(done)):  # those there now: a thread's later append wakes it again
            waiter, outcome = done.popleft()
            self.completed += 1
            if not outcome[0]:
                self.errors += 1
            waiter.switch(outcome)
        if self._accepted == self.completed and self._wake is not None:
            self._wake.ref = False  # an idle lane does not keep its loop alive

    def _closed_wake(self) -> None:
        self._deliver()
        for waiter in list(self._waiting):  # their threads are stuck: nothing else wakes them
            waiter.switch((False, LaneClosed(f"lane {self.name!r} closed while the call was "
                                             f"still running (its thread is stuck)")))

    def _start_thread(self) -> None:
        t = rpg_threads.Thread(self._work, name=f"rpg-lane-{self.name}")  # the OS keeps 15
        t.start()
        self._workers.append(t)

    def _work(self) -> None:
        # A lane thread: runs calls until it takes an exit marker.
        ident = rpg_threads.get_ident()
        tasks, done, running = self._tasks, self._done, self._running
        while True:
            task = tasks.get()
            if task is None:
                return
            waiter, fn, args, kwargs = task
            task = None
            running[ident] = monotonic()
            try:
                outcome = (True, fn(*args, **kwargs))
            except BaseException as exc:  # handed back to the caller, who raises it
                outcome = (False, exc)
            del running[ident]
            fn = args = kwargs = None  # type: ignore[assignment]  # held no longer than needed
            done.append((waiter, outcome))
            waiter = outcome = None  # type: ignore[assignment]
            with self._wake_lock:
                if self._wake is not None:
                    self._wake.send()

    # -- health --------------------------------------------------------------------------------

    def stuck(self) -> int:
        """Threads running one call for longer than ``stall_after`` seconds."""
        now = monotonic()
        return sum(1 for t in list(self._running.values()) if now - t > self.stall_after)

    @property
    def degraded(self) -> bool:
        return self.stuck() > 0

    def latency_ms(self, q: float) -> float:
        n = min(self._lat_n, LATENCY_RING)
        if n == 0:
            return 0.0
        return float(np.percentile(np.asarray(self._lat[:n]), q) * 1000.0)

    def health(self) -> dict[str, Any]:
        running = len(self._running)
        return {
            "name": self.name,
            "threads": self.threads,
            "queued": max(0, self._accepted - self.completed - running),
            "running": running,
            "stuck": self.stuck(),
            "completed": self.completed,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "rejected": self.rejected,
            "p50_ms": round(self.latency_ms(50), 3),
            "p99_ms": round(self.latency_ms(99), 3),
            "degraded": self.degraded,
        }

    # -- shutdown ------------------------------------------------------------------------------

    def close(self, wait: float = 2.0) -> int:
        """Stop accepting calls and let the threads exit; returns how many are still stuck.

        Must be called from the loop that owns the lane. Waits cooperatively up to ``wait``
        seconds for running calls to finish; a thread stuck in a blocking call cannot be killed
        and is reported (and logged) instead, and its caller, if still waiting, gets
        ``LaneClosed``.
        """
        if self._closed:
            return len(self._running)
        self._closed = True
        for _ in self._workers:
            self._tasks.put(None)  # one exit marker per thread; each takes one when idle
        deadline = monotonic() + wait
        while any(t.is_alive() for t in self._workers) and monotonic() < deadline:
            gevent.sleep(0.005)
        with self._wake_lock:
            wake, self._wake = self._wake, None
        if wake is not None:
            wake.stop()
            wake.close()
        # On the loop (a Waiter is switched from there only): outcomes that came since its last
        # wake go to their callers; the callers of calls still stuck hear LaneClosed.
        self._hub.loop.run_callback(self._closed_wake)
        left = len(self._running)
        self._workers = [t for t in self._workers if t.is_alive()]
        if left:
            self._log.warning("lane_closed_with_stuck_threads", stuck=left)
        return left


def keep_result(waiter: Waiter, keep: Callable[[Any], Any], what: str, log: Any) -> None:
    """A killed caller's last duty: wait for the call's outcome and hand it to ``keep``."""
    try:
        with gevent.Timeout(KEEP_WAIT_S):
            ok, value = waiter.get()
    except BaseException as exc:
        log.error("lane_result_not_kept", what=what, error=repr(exc))
        return
    if ok:
        keep(value)
