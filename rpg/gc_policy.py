"""Full garbage collections run when they cost rpg's loops the least (one policy per process).

CPython runs a full (generation 2) collection whenever the objects that survived into the oldest
generation have grown by a quarter. An agent starting 10,000 units grows by a quarter about 9
times, and each of those collections walks every object of every running unit: 9 pauses of its
loop of up to 99 ms each (measured; they were most of its loop lag p99 there). So the policy
turns the automatic full collections off (the young ones stay: they reclaim most cycles) and
runs them itself:

- when no loop's activity has moved for ``QUIET_S``, at most every ``EVERY_S``; and every
  ``LONGEST_S`` whatever the load, so a pilot that never rests still gets them;
- each freezes what survived it (``gc.freeze``), so the next one walks only what came since;
- when no loop holds a unit, or every ``UNFREEZE_S``, it unfreezes first, so that cycles that
  died among the frozen objects are reclaimed.

The policy changes the interpreter's collector for the whole process, so only rpg's own
processes install it by themselves: the agent (``python -m rpg.agent``), ``rpg hub serve`` and
``rpg run``. An application that embeds a session may opt in with ``rpg.gc_policy.install()``:
its full collections then run when no state has changed for ``QUIET_S``, not in the middle of a
burst of units (4,000 units on 2 cores: 2-4 pauses of 20-55 ms of the embedded hub's loop,
measured). The price: cyclic garbage that reached the oldest generation is reclaimed only at
those collections (at least every ``LONGEST_S``), and cycles that die among frozen objects only
at an unfreeze (when no unit is held, or every ``UNFREEZE_S``).

Each loop that ticks the policy is a source (the agent; every hub in the process); the process
is quiet when no source's activity counter has moved for ``QUIET_S`` (a source's moves are
seen at its ticks), and holds no unit when none of them does. Ticks may come from several
threads.
"""

from __future__ import annotations

import gc
import threading
from time import monotonic
from typing import Any, Callable

QUIET_S = 1.0  # no loop's activity moved for this long: the process is quiet
EVERY_S = 30.0  # at most one full collection this often while units come
LONGEST_S = 120.0  # and at least one this often, quiet or not
UNFREEZE_S = 600.0  # frozen objects are walked again (their dead cycles reclaimed) this often
NO_AUTOMATIC_FULL = 10**9  # gen-1 collections before an automatic full one: never

_installed: "FullCollections | None" = None
_install_lock = threading.RLock()


# -- what rpg holds, kept out of every collector's way ---------------------------------------
# A tuple or dict that holds a dict stays tracked by the collector for as long as it lives, and
# every object that survives two young collections, even one freed a moment later, counts
# toward the next full collection (CPython runs one once those reach a quarter of the oldest
# generation). A flat tuple of strings and numbers is untracked at the first collection it
# survives: it neither counts nor is walked. So what rpg keeps per state (the event stream, the
# profile's buffer) holds its fields flat. With CPython's own collector in the application (no
# policy installed), 10,000 units canceled at once set off a full collection of 40-100 ms on
# the embedded hub's time in 3 of 4 runs, most of it for the profile's buffered lines.

def flat_fields(fields: dict[str, Any] | None) -> tuple | None:
    """``fields`` as ``(k1, v1, k2, v2, ...)``, or None if there are none."""
    if not fields:
        return None
    flat: list[Any] = []
    for kv in fields.items():
        flat += kv
    return tuple(flat)


def fields_of(flat: tuple | None) -> dict[str, Any]:
    """The dict ``flat_fields`` was made from (a new one)."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)} if flat else {}


def install() -> "FullCollections":
    """This process's policy, installed now if it was not: what an application calls to opt
    in (once; later calls return the same policy)."""
    with _install_lock:
        return _installed if _installed is not None else FullCollections().install()


def installed() -> "FullCollections | None":
    """The policy installed in this process, if any (what rpg's loops tick)."""
    return _installed


class FullCollections:
    """``install()`` once per process; then each loop calls ``tick(activity, held, source)``
    about every second (``activity``: a counter that moves when units move, e.g. units started
    so far; ``held``: units it holds now) and ``forget(source)`` when it ends."""

    def __init__(self, clock: Callable[[], float] = monotonic) -> None:
        self.clock = clock
        now = clock()
        self.last_full = now
        self.last_unfreeze = now
        self.last_start = now
        self._sources: dict[str, tuple[int, int]] = {}  # source -> (activity, held)
        self._lock = threading.Lock()
        self.collections = 0
        self.unfreezes = 0
        self.longest_s = 0.0
        self._saved: tuple[int, int, int] | None = None

    def install(self) -> "FullCollections":
        """Make this the process's policy. The automatic full collections stop at the first
        tick of a loop, and come back when the last loop that ticked is forgotten: a process
        where no rpg loop runs keeps CPython's collector."""
        global _installed
        with _install_lock:
            if _installed is not None and _installed is not self:
                raise RuntimeError("a FullCollections policy is installed in this process "
                                   "already (rpg.gc_policy.installed())")
            if self._saved is None:
                self._saved = gc.get_threshold()
            _installed = self
        return self

    def uninstall(self) -> None:
        global _installed
        with _install_lock, self._lock:
            if self._saved is not None:
                gc.set_threshold(*self._saved)
                self._saved = None
            self._sources.clear()
            gc.unfreeze()
            if _installed is self:
                _installed = None

    def forget(self, source: str) -> None:
        """A loop that ticked the policy ends: its units no longer count. With the last one,
        CPython's automatic full collections come back, over every object (unfrozen)."""
        with self._lock:
            if self._sources.pop(source, None) is not None and not self._sources:
                if self._saved is not None:
                    gc.set_threshold(*self._saved)
                gc.unfreeze()

    def tick(self, activity: int, held: int, source: str = "agent") -> bool:
        """Run a full collection if it is time; True if one ran (in this thread, outside the
        lock: a finalizer it runs may tick or forget)."""
        with self._lock:
            now = self.clock()
            last = self._sources.get(source)
            if last is None or last[0] != activity:
                self.last_start = now
            if not self._sources and self._saved is not None:  # the first loop: ours from now
                young, middle, _ = self._saved
                gc.set_threshold(young, middle, NO_AUTOMATIC_FULL)
            self._sources[source] = (activity, held)
            since = now - self.last_full
            if not (since >= LONGEST_S or (since >= EVERY_S and now - self.last_start >= QUIET_S)):
                return False
            self.last_full = now  # taken: another thread's tick does not collect too
            unfreeze = (sum(h for _a, h in self._sources.values()) == 0
                        or now - self.last_unfreeze >= UNFREEZE_S)
            if unfreeze:
                self.last_unfreeze = now
                self.unfreezes += 1
            self.collections += 1
        t0 = monotonic()
        if unfreeze:
            gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.longest_s = max(self.longest_s, monotonic() - t0)
        return True

    def stats(self) -> dict[str, Any]:
        return {"full_collections": self.collections, "unfreezes": self.unfreezes,
                "longest_ms": round(self.longest_s * 1000, 1), "frozen": gc.get_freeze_count(),
                "sources": len(self._sources)}
