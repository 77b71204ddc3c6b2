"""Loop watch: gevent's monitor thread for a loop rpg runs, plus a loop-lag ticker.

Every block of the loop longer than ``gevent.config.max_blocking_time`` (default 0.1 s) becomes
an ``EventLoopBlocked`` event; rpg logs it through structlog and counts it (per watch and in
total). The ticker greenlet sleeps ``tick`` seconds at a time and records how late it woke up,
which gives the loop-lag percentiles the benchmarks report. Given ``busy`` (a callable: does
the loop hold work, units not yet final?), the ticker rests while it says no: one tick every
``IDLE_TICK_S``, not every ``tick``, until it says yes or ``wake()`` is called (work came). A
tick costs 80-130 us of CPU on this VM (a bare gevent loop sleeping 10 ms at a time spends
8-13 ms a second): an idle agent spent 19-21 ms a second with its ticker at 10 ms, 12-13
resting (``bench/idle.py``). Starting the watch also asks the
kernel for short time slices for the loop's thread (``rpg.threads.request_short_slice``): a
loop sleeps most of the time and must run as soon as it wakes, and on a machine whose cores
the units fill, waiting out another task's slice was most of the agent's loop lag.
"""

from __future__ import annotations

import sys
import threading
import weakref
from time import perf_counter
from typing import Any, Callable

import gevent
import numpy as np
import zope.event
from gevent.event import Event
from gevent.events import EventLoopBlocked

from rpg.internals import QuietMonitor
from rpg.log import get_logger
from rpg.threads import loop_priority, request_short_slice

_total_lock = threading.Lock()
_total_blocked = 0
_watches: "weakref.WeakKeyDictionary[Any, LoopWatch]" = weakref.WeakKeyDictionary()
LOOP_SLICE_S = 0.0003  # 4,000 units starting on 2 cores: agent lag p99 16-19 -> 12 ms (0.1: 14-17)
TURN_S = 1e-6  # a timer already due when the loop next looks: it polls, runs due timers, goes on
IDLE_TICK_S = 0.1  # the ticker's interval while its loop holds no work (``busy``)
_last_turn: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()


def yield_to_loop() -> None:
    """End a slice of work on a loop: what the slice woke runs, and, once a switch interval
    and a quarter have gone by since the last turn, the loop polls and runs its due timers and
    IO before this greenlet goes on.

    ``gevent.sleep(0)`` alone lets only the callbacks run: gevent runs the callbacks queued
    meanwhile in the same pass, looking at the clock only every 50, and ten 1 ms slices of a
    push ran back to back while the loop's timers waited (hub loop lag 16-19 ms while 10,000
    units were canceled). A positive sleep is a timer, which gevent runs at the next turn of
    the loop. The ``sleep(0)`` first: a reader that woke units faster than they ran made a
    backlog of 9,000 callbacks, and CPython's young collection took 5-13 ms over them.

    Why not turn the loop after every slice: its poll releases the GIL for a moment, and each
    such release restarts the wait of a thread that wants the GIL (CPython asks the holder to
    let go only once a waiter has waited a whole switch interval). Turns 1 ms apart starved
    the application's threads for the whole of a 20,000-unit submit; turns a switch interval
    and a quarter apart leave them the GIL as before."""
    gevent.sleep(0)
    hub = gevent.get_hub()
    now = perf_counter()
    if now - _last_turn.get(hub, 0.0) >= sys.getswitchinterval() * 1.25:
        gevent.sleep(TURN_S)
        _last_turn[hub] = perf_counter()


def loop_blocked_total() -> int:
    """EventLoopBlocked events seen by every LoopWatch in this process."""
    return _total_blocked


def _on_gevent_event(event: Any) -> None:
    global _total_blocked
    if not isinstance(event, EventLoopBlocked):
        return
    hub = getattr(event, "hub", None)
    watch = _watches.get(hub) if hub is not None else None
    if watch is None:
        return
    with _total_lock:
        _total_blocked += 1
    watch._blocked(event)


zope.event.subscribers.append(_on_gevent_event)


def _blocked_stack(info: Any) -> str:
    """The blocked greenlet's stack from gevent's report, without the all-threads dump."""
    lines: list[str] = []
    for line in info or []:
        text = str(line)
        if text.startswith("Info:"):
            break
        if text.strip() and not text.startswith("===="):
            lines.append(text)
    return "\n".join(lines[-12:])


class LoopWatch:
    """Watches one gevent loop. ``start`` and ``stop`` must run in that loop's thread."""

    def __init__(self, name: str, tick: float = 0.01, ring: int = 8192,
                 busy: Callable[[], bool] | None = None,
                 idle_tick: float = IDLE_TICK_S) -> None:
        self.name = name
        self.tick = tick
        self.busy = busy  # None: the loop counts as busy always (a tick every ``tick``)
        self.idle_tick = idle_tick
        self.rests = 0  # ticks taken at ``idle_tick``
        self._work = Event()  # set by wake(): work came while the ticker rested
        self.blocked_events = 0
        self.max_blocked_s = 0.0
        self._lags = np.zeros(ring, dtype=np.float64)
        self._ends = np.zeros(ring, dtype=np.float64)  # perf_counter when each tick woke
        self._n = 0
        self._hub: Any = None
        self._monitor: Any = None
        self._own_monitor = False
        self._ticker: Any = None
        self.slice_s: float | None = None  # the time slice the kernel gave the loop's thread
        self.priority: dict[str, int | None] = {}  # its nice and autogroup nice (at start)
        self._log = get_logger("loop_watch", loop=name)

    def start(self) -> "LoopWatch":
        hub = gevent.get_hub()
        self._hub = hub
        self.slice_s = request_short_slice(LOOP_SLICE_S)
        self.priority = loop_priority()
        if any((v or 0) > 0 for v in self.priority.values()):  # 0, None, below: fine
            self._log.warning(
                "loop_niced", **self.priority,
                why="this loop runs below normal priority (inherited from the process or its "
                    "session): its pilot's units and its agent outrank it for the cores, and "
                    "its lag grows while they are busy; start the application at nice 0")
        _watches[hub] = self
        if hub.periodic_monitoring_thread is None:
            self._monitor = QuietMonitor(hub)
            hub.periodic_monitoring_thread = self._monitor
            self._own_monitor = True
        else:
            self._monitor = hub.periodic_monitoring_thread
        self._ticker = gevent.spawn(self._tick_loop)
        return self

    def _blocked(self, event: Any) -> None:
        self.blocked_events += 1
        self.max_blocked_s = max(self.max_blocked_s, float(event.blocking_time))
        self._log.warning(
            "event_loop_blocked",
            blocking_time_s=event.blocking_time,
            greenlet=repr(event.greenlet),
            stack=_blocked_stack(event.info),
        )

    def _is_busy(self) -> bool:
        try:
            return bool(self.busy())  # type: ignore[misc]
        except Exception as exc:  # a broken test never stops the ticker: it ticks as if busy
            self._log.error("loop_watch_busy_failed", error=repr(exc))
            self.busy = None
            return True

    def wake(self) -> None:
        """Work came: a resting ticker ticks every ``tick`` from now (in the loop's thread)."""
        self._work.set()

    def _tick_loop(self) -> None:
        tick, work = self.tick, self._work
        ring = len(self._lags)
        while True:
            if self.busy is None or self._is_busy():
                wait = tick
                t0 = perf_counter()
                gevent.sleep(tick)
            else:
                wait = self.idle_tick
                work.clear()
                t0 = perf_counter()
                if work.wait(wait):  # woken early: no lag to measure on this wait
                    continue
                self.rests += 1
            t1 = perf_counter()
            lag = t1 - t0 - wait
            i = self._n % ring
            self._lags[i] = lag if lag > 0 else 0.0
            self._ends[i] = t1
            self._n += 1

    def lag_ms(self, q: float) -> float:
        n = min(self._n, len(self._lags))
        if n == 0:
            return 0.0
        return float(np.percentile(self._lags[:n], q) * 1000.0)

    def max_lag_ms(self) -> float:
        n = min(self._n, len(self._lags))
        return float(self._lags[:n].max() * 1000.0) if n else 0.0

    def ticks(self) -> np.ndarray:
        """The ticks kept, oldest first: rows of (perf_counter when it woke, lag in s). The
        clock is CLOCK_MONOTONIC, the same in every process of the machine, so a benchmark can
        cut another process's ticks by its own times (``lag_window``)."""
        n = min(self._n, len(self._lags))
        order = np.arange(self._n - n, self._n) % len(self._lags)
        return np.column_stack((self._ends[order], self._lags[order]))

    def stats(self) -> dict[str, Any]:
        return {
            "loop": self.name,
            "blocked_events": self.blocked_events,
            "lag_p50_ms": round(self.lag_ms(50), 3),
            "lag_p99_ms": round(self.lag_ms(99), 3),
            "lag_max_ms": round(self.max_lag_ms(), 3),
            "ticks": self._n,
            "rests": self.rests,
            "slice_ms": None if self.slice_s is None else round(self.slice_s * 1000, 3),
            **self.priority,
        }

    def stop(self) -> None:
        if self._ticker is not None:
            # Blocking: a greenlet left suspended when its thread ends is never unwound.
            self._ticker.kill(block=True, timeout=1.0)
            self._ticker = None
        if self._own_monitor and self._monitor is not None:
            self._monitor.kill()
            if self._hub is not None and self._hub.periodic_monitoring_thread is self._monitor:
                self._hub.periodic_monitoring_thread = None
            self._monitor = None
            self._own_monitor = False
        if self._hub is not None:
            _watches.pop(self._hub, None)


def lag_window(ticks: np.ndarray, start: float, end: float) -> dict[str, Any]:
    """Loop-lag percentiles of the ticks (``LoopWatch.ticks``) that woke between ``start`` and
    ``end`` (perf_counter seconds)."""
    lags = ticks[(ticks[:, 0] >= start) & (ticks[:, 0] <= end), 1] if len(ticks) else ticks
    if not len(lags):
        return {"ticks": 0, "lag_p50_ms": 0.0, "lag_p99_ms": 0.0, "lag_max_ms": 0.0}
    return {"ticks": int(len(lags)),
            "lag_p50_ms": round(float(np.percentile(lags, 50)) * 1000, 3),
            "lag_p99_ms": round(float(np.percentile(lags, 99)) * 1000, 3),
            "lag_max_ms": round(float(lags.max()) * 1000, 3)}
