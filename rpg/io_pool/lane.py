"""Lanes: named, bounded pools of real OS threads that run blocking calls for a gevent loop.

A greenlet calls ``lane.run(fn, *args, timeout=...)``; ``fn`` runs on one of the lane's native
threads, and the calling greenlet sleeps (cooperatively) until the thread is done; the loop is
woken by gevent's async watcher (``gevent.threadpool``). A call that outlives its timeout raises
``IOTimeout`` in the caller; the thread stays stuck in ``fn`` (a thread cannot be killed) and is
counted as stuck until ``fn`` returns.
"""

from __future__ import annotations

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
        # The hot path takes no lock (it cost a tenth of a round trip), and the lane's threads
        # do as little as they can (they hold the GIL the loop waits for): the loop thread alone
        # counts calls accepted, finished and failed (a call its caller left is counted when its
        # result comes) and keeps the latency ring; each thread writes its own ``_running``.
        self._accepted = 0  # calls handed to the pool
        self.completed = 0  # of those, finished by a thread
        self.errors = 0  # of those, raised
        self._running: dict[int, float] = {}  # thread ident -> monotonic start of its call
        self._marked: set[int] = set()  # lane threads counted as rpg's (rpg.threads)
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
        submitted = perf_counter()
        timer = gevent.Timeout._start_new_or_dummy(timeout) if timeout is not None else None
        self._accepted += 1
        try:
            result = self._pool.spawn(self._call, fn, args, kwargs)
        except BaseException:
            self._accepted -= 1
            if timer is not None:
                timer.close()
            raise
        try:
            ok, value = result.get()
        except BaseException as exc:
            result.rawlink(self._late)  # the thread's result, when it comes, is counted
            if timer is not None and exc is timer:
                self.timeouts += 1
                self._lat[self._lat_n % LATENCY_RING] = perf_counter() - submitted  # a stall
                self._lat_n += 1
                self._log.warning("lane_timeout", what=_name_of(fn), timeout=timeout)
                raise IOTimeout(self.name, _name_of(fn), timeout or 0.0) from None
            if keep is not None:
                keep_result(result, keep, _name_of(fn), self._log)
            raise
        finally:
            if timer is not None:
                timer.close()
        self.completed += 1
        self._lat[self._lat_n % LATENCY_RING] = perf_counter() - submitted
        self._lat_n += 1
        if ok:
            return value
        self.errors += 1
        raise value

    def _late(self, result: Any) -> None:
        """The result of a call its caller left (timed out, killed), on the loop."""
        self.completed += 1
        if not (result.successful() and result.value[0]):
            self.errors += 1

    def _call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        # Runs on the lane's native thread.
        ident = rpg_threads.get_ident()  # the original: never a patched one
        if ident not in self._marked:
            rpg_threads.mark_current()
            self._marked.add(ident)
        running = self._running
        running[ident] = monotonic()
        try:
            return True, fn(*args, **kwargs)
        except Exception as exc:
            # Handed back to the caller, who raises it; gevent would print it as a crash.
            return False, exc
        finally:
            del running[ident]

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
