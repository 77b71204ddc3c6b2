"""Binding policy: which pilot a unit goes to.

A unit manager lists the pilots its units may use; a unit goes to one of them that is live,
big enough, and whose tags match (``{"pilot": uid}`` pins one). Among those, round robin over
the pilots with free capacity, else the least loaded. Lifecycles wait on ``changed`` when no
pilot can take a unit yet.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from gevent.event import Event

if TYPE_CHECKING:
    from rpg.hub.records import PilotRecord, UnitRecord


class Binding:
    def __init__(self, pilots: dict[str, "PilotRecord"]) -> None:
        self._pilots = pilots
        self.umgr_pilots: dict[str, list[str]] = {}
        self._rr = itertools.count()
        self._changed = Event()

    # -- which pilots a unit manager may use -----------------------------------------------------

    def add(self, umgr: str, uids: list[str]) -> None:
        lst = self.umgr_pilots.setdefault(umgr, [])
        for uid in uids:
            if uid not in lst:
                lst.append(uid)
        self.changed()

    def remove(self, umgr: str, uids: list[str]) -> None:
        lst = self.umgr_pilots.setdefault(umgr, [])
        self.umgr_pilots[umgr] = [u for u in lst if u not in uids]
        self.changed()

    def changed(self) -> None:
        """Pilots came, went or freed capacity: wake every unit waiting for one."""
        ev, self._changed = self._changed, Event()
        ev.set()

    def wait_changed(self, timeout: float | None = None) -> None:
        self._changed.wait(timeout)

    # -- the choice ------------------------------------------------------------------------------

    def choose(self, unit: "UnitRecord") -> tuple["PilotRecord | None", str | None]:
        """(pilot, None) to bind to, (None, None) to wait, or (None, reason) to fail."""
        uids = self.umgr_pilots.get(unit.umgr, [])
        pilots = [self._pilots[u] for u in uids if u in self._pilots]
        if not pilots:
            return None, None
        want_cores = int(unit.desc["cores"])
        want_gpus = int(unit.desc["gpus"])
        tags = unit.desc.get("tags") or {}
        live = [p for p in pilots if p.active()]
        if not live:
            if unit.desc.get("restartable"):
                return None, None  # waits for a pilot to be added
            return None, "no pilot left to run it: every pilot of its unit manager has ended"
        fits = [p for p in live if p.cores >= want_cores and int(p.desc["gpus"]) >= want_gpus
                and tags_match(tags, p)]
        if not fits:
            return None, (f"no pilot can run it: it needs {want_cores} cores, {want_gpus} gpus"
                          f"{', tags ' + repr(tags) if tags else ''}")
        start = next(self._rr) % len(fits)
        ordered = fits[start:] + fits[:start]
        for p in ordered:
            if p.load_cores + want_cores <= p.cores:
                return p, None
        return min(ordered, key=lambda p: p.load_cores / p.cores), None


def tags_match(tags: dict[str, Any], pilot: "PilotRecord") -> bool:
    ptags = pilot.desc.get("tags") or {}
    for k, v in tags.items():
        if k == "pilot":
            if v != pilot.uid:
                return False
        elif ptags.get(k) != v:
            return False
    return True
