"""Lanes: named, bounded pools of real OS threads that run blocking calls for a gevent loop.

A greenlet calls ``lane.run(fn, *args, timeout=...)``; ``fn`` runs on one of the lane's native
threads, and the calling greenlet sleeps (cooperatively) until the thread is done; the loop is
woken by gevent's async watcher (``gevent.threadpool``). A call that outlives its timeout raises
``IOTimeout`` in the caller; the thread stays stuck in ``fn`` (a thread cannot be killed) and is
counted as stuck until ``fn`` returns.
"""

from __future__ import annotations

import itertools
import threading
from time import monotonic, perf_counter
from typing import Any, Callable, TypeVar

import gevent
import numpy as np
from gevent.threadpool import ThreadPool

from rpg import internals
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
    """A named pool of ``threads`` native threads with a bounded queue of ``queue_limit`` calls."""

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
        self._pool = ThreadPool(threads, hub=self._hub)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._outstanding = 0  # accepted and not finished by a thread (queued + running)
        self._running: dict[int, float] = {}  # op id -> monotonic start, kept by the threads
        self._lat = np.zeros(LATENCY_RING, dtype=np.float64)
        self._lat_n = 0
        self.completed = 0
        self.errors = 0
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
        if self.fail_fast and self.stuck() > 0:
            self.rejected += 1
            raise LaneDegraded(
                f"lane {self.name!r} is degraded ({self.stuck()} stuck threads) and fails fast"
            )
        with self._lock:
            if self._outstanding >= self.threads + self.queue_limit:
                self.rejected += 1
                raise LaneFull(
                    f"lane {self.name!r} is full: {self._outstanding} calls outstanding "
                    f"(threads={self.threads}, queue_limit={self.queue_limit})"
                )
            self._outstanding += 1
        op = next(self._ids)
        submitted = perf_counter()
        queued = False
        timer = gevent.Timeout._start_new_or_dummy(timeout)
        try:
            result = self._pool.spawn(self._call, op, fn, args, kwargs, submitted)
            queued = True
            ok, value = result.get()
            if ok:
                return value
            raise value
        except gevent.Timeout as t:
            if t is not timer:
                raise
            self.timeouts += 1
            self._log.warning("lane_timeout", what=_name_of(fn), timeout=timeout)
            raise IOTimeout(self.name, _name_of(fn), timeout or 0.0) from None
        except BaseException:
            if keep is not None and queued:
                keep_result(result, keep, _name_of(fn), self._log)
            raise
        finally:
            timer.close()
            if not queued:
                with self._lock:
                    self._outstanding -= 1

    def _call(self, op: int, fn: Callable[..., Any], args: tuple, kwargs: dict,
              submitted: float) -> Any:
        # Runs on the lane's native thread.
        rpg_threads.mark_current()
        self._running[op] = monotonic()
        ok = False
        try:
            out = fn(*args, **kwargs)
            ok = True
            return True, out
        except Exception as exc:
            # Handed back to the caller, who raises it; gevent would print it as a crash.
            return False, exc
        finally:
            done = perf_counter()
            with self._lock:
                self._running.pop(op, None)
                self._outstanding -= 1
                self.completed += 1
                if not ok:
                    self.errors += 1
                self._lat[self._lat_n % LATENCY_RING] = done - submitted
                self._lat_n += 1

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
        return float(np.percentile(self._lat[:n], q) * 1000.0)

    def health(self) -> dict[str, Any]:
        running = len(self._running)
        return {
            "name": self.name,
            "threads": self.threads,
            "queued": max(0, self._outstanding - running),
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
        seconds for idle threads to exit; a thread stuck in a blocking call cannot be killed
        and is reported (and logged) instead.
        """
        if self._closed:
            return len(self._running)
        self._closed = True
        pool = self._pool
        # Not ThreadPool.kill(): it waits for *every* worker, and a stuck one never comes back.
        # One stop marker per worker; each idle thread takes one and exits.
        internals.threadpool_stop_idle(pool)
        deadline = monotonic() + wait
        # Idle threads leave at once; a running call gets until the deadline to finish.
        while internals.threadpool_workers(pool) and monotonic() < deadline:
            gevent.sleep(0.005)
        internals.threadpool_release(pool)
        left = len(self._running)
        if left:
            self._log.warning("lane_closed_with_stuck_threads", stuck=left)
        return left


def keep_result(result: Any, keep: Callable[[Any], Any], what: str, log: Any) -> None:
    """A killed caller's last duty: wait for the call's result and hand it to ``keep``."""
    try:
        ok, value = result.get(timeout=KEEP_WAIT_S)
    except BaseException as exc:
        log.error("lane_result_not_kept", what=what, error=repr(exc))
        return
    if ok:
        keep(value)
