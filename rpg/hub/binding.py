"""Late binding: units wait here until a pilot with room for them pulls.

A unit manager lists the pilots its units may use. A submitted unit is not bound at once: it
waits in its manager's queue for units of its shape (cores, gpus, tags) and is bound when the
agent of a pilot it fits pulls while that pilot has room: the cores of the units bound there
and not final, against the pilot's cores plus a prefetch (units its agent holds ready, so its
cores never wait for a pull). A pilot that joins later, or frees its cores sooner, takes more:
units go where capacity is, not where round robin sent them at submit (RADICAL-Pilot #297,
#673). Among the shapes a pilot fits, the unit that waited longest goes first; one that does not
fit the room yet is not overtaken, so big units do not starve behind small ones. A unit with a
``runtime`` estimate fits only a pilot with that much time left (walltime-aware draining; the
agent checks again before it starts it); a retried unit skips the pilot it failed on while
another live pilot fits it.

A unit that no pilot can ever run ends here, with the reason: FAILED if none of its manager's
live pilots is big enough or has its tags; if every one has ended (a restartable unit waits for
a new one), CANCELED when the application canceled them all while it waited, else FAILED (a unit
submitted after that cancel was not its target). ``review`` checks that again whenever the
pilots change. Hub loop only.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator

from rpg import states
from rpg.io_pool import yield_to_loop
from rpg.states import Why

if TYPE_CHECKING:
    from rpg.hub.records import PilotRecord, UnitRecord

# Units an agent holds beyond its cores, in cores: at least this many, or as many as its cores,
# or what it gets through in PREFETCH_S at its pace (a bandwidth-delay product: its cores never
# wait for a pull and a push to go round, at the null-unit rate either, bench/throughput.py).
# Few enough that a small pilot does not hoard what a bigger one joining later could run: at
# most PREFETCH_S of its own work (bench/late_binding.py).
PREFETCH_MIN = 32
PREFETCH_S = 0.075
WAKE_FRACTION = 4  # a busy pilot's pull wakes when this fraction of its capacity is free
FAIL_SLICE = 500  # units failed per slice (yield_to_loop) when their last pilot goes

# Units of runtimes within this factor share a queue: few queues however many estimates differ.
RUNTIME_STEP = 1.25

# cores, gpus, restartable, tags, the pilot a retried unit's last attempt failed on, and the
# runtime's step (its estimate, RUNTIME_STEP ** step s at most)
Shape = tuple[int, int, bool, tuple[tuple[str, str], ...], "str | None", "int | None"]


def shape_of(unit: "UnitRecord") -> Shape:
    """What decides which pilots can run a unit, and whether it may wait for one to come."""
    desc = unit.desc
    tags = desc.get("tags") or {}
    runtime = desc.get("runtime")
    return (int(desc["cores"]), int(desc.get("gpus") or 0), bool(desc.get("restartable")),
            tuple(sorted((str(k), repr(v)) for k, v in tags.items())), unit.avoid,
            math.ceil(math.log(runtime, RUNTIME_STEP)) if runtime else None)


def capacity(pilot: "PilotRecord") -> int:
    """The cores' worth of units a pilot may have bound and not final."""
    return pilot.cores + max(pilot.cores, PREFETCH_MIN, int(pilot.pace.per_s() * PREFETCH_S))


class Binding:
    def __init__(self, pilots: dict[str, "PilotRecord"],
                 end: Callable[["UnitRecord", str, str], None]) -> None:
        self._pilots = pilots
        self._end = end  # ends a unit (state, reason) with Why.NO_PILOT
        self.umgr_pilots: dict[str, list[str]] = {}
        self._queues: dict[str, dict[Shape, deque[UnitRecord]]] = {}

    # -- which pilots a unit manager may use -----------------------------------------------------

    def add(self, umgr: str, uids: list[str]) -> None:
        lst = self.umgr_pilots.setdefault(umgr, [])
        for uid in uids:
            if uid not in lst:
                lst.append(uid)
        self.review()
        self.wake(umgr)

    def remove(self, umgr: str, uids: list[str]) -> None:
        lst = self.umgr_pilots.setdefault(umgr, [])
        self.umgr_pilots[umgr] = [u for u in lst if u not in uids]
        self.review()

    def _pilots_of(self, umgr: str) -> list["PilotRecord"]:
        return [self._pilots[u] for u in self.umgr_pilots.get(umgr, ()) if u in self._pilots]

    # -- units waiting ---------------------------------------------------------------------------

    def wait(self, unit: "UnitRecord", first: bool = False) -> None:
        """Queue a unit (NEW) for a pilot; ``first`` puts it ahead of its shape's queue (a unit
        that was bound before and starts over). Fails it now if no pilot can ever run it. Call
        ``wake(umgr)`` after a batch of these."""
        shapes = self._queues.setdefault(unit.umgr, {})
        shape = shape_of(unit)
        q = shapes.get(shape)
        if not q:  # a non-empty queue of this shape passed the last review
            verdict = self._verdict(unit, submitted=not first)
            if verdict is not None:
                self._end(unit, *verdict)
                return
            if q is None:
                q = shapes[shape] = deque()
        if first:
            q.appendleft(unit)
        else:
            q.append(unit)

    def wake(self, umgr: str) -> None:
        """Units of ``umgr`` are waiting: wake the long poll of each of its pilots that can
        take some now."""
        for p in self._pilots_of(umgr):
            if p.active() and self.ready(p):
                p.wake.set()

    def released(self, pilot: "PilotRecord") -> None:
        """A unit of ``pilot`` ended or left it: wake its agent's pull if it can take more."""
        if pilot.active() and self.ready(pilot):
            pilot.wake.set()

    def could_run_elsewhere(self, unit: "UnitRecord", but: str | None = None) -> bool:
        """Is there a live pilot, other than ``but`` (default: its own, which is ending), that
        it fits?"""
        but = but or unit.pilot
        return any(p.active() and p.uid != but and self._fits(p, unit)
                   for p in self._pilots_of(unit.umgr))

    def could_run(self, unit: "UnitRecord") -> bool:
        """Is there a live pilot (its own included) that it fits?"""
        return any(p.active() and self._fits(p, unit) for p in self._pilots_of(unit.umgr))

    def waiting(self) -> int:
        """Units queued here (canceled ones not yet dropped included)."""
        return sum(len(q) for shapes in self._queues.values() for q in shapes.values())

    # -- what a pilot's pull takes ---------------------------------------------------------------

    def ready(self, pilot: "PilotRecord") -> bool:
        """Would a pull by ``pilot`` take a unit now? A busy pilot waits for a WAKE_FRACTION of
        its capacity, so that its pulls come back with many units."""
        cap = capacity(pilot)
        room = cap - pilot.load_cores
        if room <= 0 or (pilot.load_cores and room < cap // WAKE_FRACTION):
            return False
        head = self._oldest(self._candidates(pilot))
        return head is not None and int(head[0].desc["cores"]) <= room

    def take(self, pilot: "PilotRecord") -> Iterator["UnitRecord"]:
        """Units for ``pilot`` while it has room, the longest-waiting first. The caller binds
        each one it takes (which fills the room) and stops when it has enough."""
        cands = self._candidates(pilot)
        cap = capacity(pilot)  # its pace does not change while it takes
        while cands:
            head = self._oldest(cands)
            if head is None:
                return
            unit, q = head
            if int(unit.desc["cores"]) > cap - pilot.load_cores:
                return
            q.popleft()
            yield unit

    def _candidates(self, pilot: "PilotRecord") -> list[deque["UnitRecord"]]:
        out = []
        for umgr, uids in self.umgr_pilots.items():
            if pilot.uid not in uids:
                continue
            for shape, q in self._queues.get(umgr, {}).items():
                _drop_ended(q)
                if q and self._fits(pilot, q[0]) and not (
                        shape[4] == pilot.uid and self.could_run_elsewhere(q[0], pilot.uid)):
                    out.append(q)
        return out

    @staticmethod
    def _oldest(cands: list[deque["UnitRecord"]]) -> tuple["UnitRecord", deque] | None:
        best = None
        for q in cands:
            _drop_ended(q)
            if q and (best is None or (q[0].created, q[0].uid) < (best[0].created, best[0].uid)):
                best = (q[0], q)
        return best

    # -- can it ever run? ------------------------------------------------------------------------

    @staticmethod
    def _fits(pilot: "PilotRecord", unit: "UnitRecord") -> bool:
        return _fits_shape(pilot, unit) and has_time(pilot, unit)

    def _verdict(self, unit: "UnitRecord", submitted: bool = False) -> tuple[str, str] | None:
        """None if some pilot runs it or may yet; else how it ends and why none ever will. A
        unit ``submitted`` after the application canceled every pilot FAILS: the cancel was not
        meant for it."""
        pilots = self._pilots_of(unit.umgr)
        if not pilots:
            return None  # its manager has no pilot yet
        live = [p for p in pilots if p.active()]
        if not live:
            if unit.desc.get("restartable"):
                return None  # waits for a pilot to be added
            by_app = all(p.state == states.CANCELED or p.final_why == Why.CANCELED
                         for p in pilots)
            if by_app and not submitted:
                return states.CANCELED, ("no pilot left to run it: the application canceled "
                                         "every pilot of its unit manager")
            return states.FAILED, ("no pilot left to run it: every pilot of its unit manager "
                                   "has ended" + (", canceled by the application" if by_app
                                                  else ""))
        if not any(self._fits(p, unit) for p in live):
            desc = unit.desc
            shaped = [p for p in live if _fits_shape(p, unit)]
            if shaped:  # big enough, but none has the time
                left = [p.time_left() or 0.0 for p in shaped]
                return states.FAILED, (f"no pilot has time for it: its runtime is "
                                       f"{desc['runtime']:g} s, the most any pilot of its "
                                       f"unit manager has left is {max(left):.0f} s")
            tags = desc.get("tags") or {}
            return states.FAILED, (f"no pilot can run it: it needs {desc['cores']} cores, "
                                   f"{desc.get('gpus') or 0} gpus"
                                   f"{', tags ' + repr(tags) if tags else ''}")
        return None

    def review(self) -> None:
        """The pilots changed: fail the units that none of them can ever run now, and wake
        the pilots that may take units now (a retried unit that avoided a pilot that was the
        only other one left)."""
        for umgr, shapes in list(self._queues.items()):
            for shape, q in list(shapes.items()):
                _drop_ended(q)
                done = 0
                while q:
                    verdict = self._verdict(q[0])
                    if verdict is None:
                        break
                    self._end(q.popleft(), *verdict)
                    done += 1
                    if done % FAIL_SLICE == 0:
                        yield_to_loop()  # 20,000 units failing at once must not hold the loop
                        _drop_ended(q)
                if not q and shapes.get(shape) is q:
                    del shapes[shape]
            if shapes:
                self.wake(umgr)


def _drop_ended(q: deque["UnitRecord"]) -> None:
    """Canceled while waiting: their entries go when they reach the head."""
    while q and states.is_final(q[0].state):
        q.popleft()


def _fits_shape(pilot: "PilotRecord", unit: "UnitRecord") -> bool:
    desc = unit.desc
    return (pilot.cores >= int(desc["cores"])
            and int(pilot.desc.get("gpus") or 0) >= int(desc.get("gpus") or 0)
            and tags_match(desc.get("tags") or {}, pilot))


def has_time(pilot: "PilotRecord", unit: "UnitRecord") -> bool:
    """Would the unit (its ``runtime`` estimate) end before its pilot's runtime runs out?"""
    runtime = unit.desc.get("runtime")
    if not runtime:
        return True
    left = pilot.time_left()
    return left is None or runtime <= left


def tags_match(tags: dict[str, Any], pilot: "PilotRecord") -> bool:
    ptags = pilot.desc.get("tags") or {}
    for k, v in tags.items():
        if k == "pilot":
            if v != pilot.uid:
                return False
        elif ptags.get(k) != v:
            return False
    return True
