"""The agent process's full garbage collections, run when they cost its loop the least.

CPython runs a full (generation 2) collection whenever the objects that survived into the oldest
generation have grown by a quarter. An agent starting 10,000 units grows by a quarter about 9
times, and each of those collections walks every object of every running unit: 9 pauses of its
loop of up to 99 ms each (measured; they were most of its loop lag p99 there). So the agent
turns the automatic full collections off (the young ones stay: they reclaim most cycles) and
runs them itself:

- when no unit has started for ``QUIET_S``, at most every ``EVERY_S``; and every ``LONGEST_S``
  whatever the load, so a pilot that never rests still gets them;
- each freezes what survived it (``gc.freeze``), so the next one walks only what came since;
- when the agent holds no unit, or every ``UNFREEZE_S``, it unfreezes first, so that cycles
  that died among the frozen objects are reclaimed.

Only the agent's own process uses this (``python -m rpg.agent``): it changes the interpreter's
collector for the whole process, which a library must not do to an application.
"""

from __future__ import annotations

import gc
from time import monotonic
from typing import Any, Callable

QUIET_S = 1.0  # no unit started for this long: the loop is quiet
EVERY_S = 30.0  # at most one full collection this often while units come
LONGEST_S = 120.0  # and at least one this often, quiet or not
UNFREEZE_S = 600.0  # frozen objects are walked again (their dead cycles reclaimed) this often
NO_AUTOMATIC_FULL = 10**9  # gen-1 collections before an automatic full one: never


class FullCollections:
    """``install()`` once in the agent's process; ``tick(started, held)`` about every second
    from its loop (``started``: units started so far; ``held``: units it holds now)."""

    def __init__(self, clock: Callable[[], float] = monotonic) -> None:
        self.clock = clock
        now = clock()
        self.last_full = now
        self.last_unfreeze = now
        self.last_start = now
        self.started = -1
        self.collections = 0
        self.unfreezes = 0
        self.longest_s = 0.0
        self._saved: tuple[int, int, int] | None = None

    def install(self) -> "FullCollections":
        self._saved = gc.get_threshold()
        young, middle, _ = self._saved
        gc.set_threshold(young, middle, NO_AUTOMATIC_FULL)
        return self

    def uninstall(self) -> None:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None
        gc.unfreeze()

    def tick(self, started: int, held: int) -> bool:
        """Run a full collection if it is time; True if one ran."""
        now = self.clock()
        if started != self.started:
            self.started = started
            self.last_start = now
        since = now - self.last_full
        due = since >= LONGEST_S or (since >= EVERY_S and now - self.last_start >= QUIET_S)
        if not due:
            return False
        t0 = monotonic()
        if held == 0 or now - self.last_unfreeze >= UNFREEZE_S:
            gc.unfreeze()
            self.last_unfreeze = now
            self.unfreezes += 1
        gc.collect()
        gc.freeze()
        self.longest_s = max(self.longest_s, monotonic() - t0)
        self.last_full = now
        self.collections += 1
        return True

    def stats(self) -> dict[str, Any]:
        return {"full_collections": self.collections, "unfreezes": self.unfreezes,
                "longest_ms": round(self.longest_s * 1000, 1), "frozen": gc.get_freeze_count()}
