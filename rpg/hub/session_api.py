"""What a client may ask of its session: the per-session calls of the client protocol.

Both transports end here: the embedded Session calls these methods directly (in-process), and
the hub service's front (rpg/hub/front.py) calls them after it has checked the caller's token,
the session's owner and every argument. Callable from any thread, never blocking a loop: work is
posted to the session's hub loop; uids are taken from the hub's counter at once, so a reply
names every object the call made.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from rpg.hub.events import Event
from rpg.hub.hub import Hub, HubError

EVENTS_MAX = 20000  # events one read returns at most


class SessionAPI:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.pilot_uids: set[str] = set()  # every pilot submitted, made on the loop or not yet

    @property
    def uid(self) -> str:
        return self.hub.session_uid

    def _post(self, fn: Any, *args: Any) -> None:
        self.hub.post(fn, *args)  # HubError once the session is closed

    def _journal(self, *record: Any) -> None:
        """A hub service's session journals the request (rpg/hub/journal.py); the front
        replies once it is written (``durable``)."""
        if self.hub.journal is not None:
            self.hub.journal.add(*record)

    def durable(self) -> None:
        """Wait (on the service's loop) until every request journaled so far is written."""
        if self.hub.journal is not None:
            self.hub.journal.sync()

    def new_manager(self, kind: str) -> str:
        """A pilot or unit manager of this session (kept for clients that attach later)."""
        if self.hub.closed:
            raise HubError("the session is closed")
        uid = self.hub.next_uid("pmgr" if kind == "pilot" else "umgr")
        self.hub.managers[uid] = kind
        self._journal("mgr", uid, kind)
        return uid

    def submit_pilots(self, pmgr: str, descs: list[dict[str, Any]]) -> list[str]:
        uids = [self.hub.next_uid("pilot") for _ in descs]
        self.pilot_uids.update(uids)
        items = [(uid, d, secrets.token_urlsafe(32)) for uid, d in zip(uids, descs, strict=True)]
        self._post(self.hub.submit_pilots, pmgr, items)
        self._journal("pilots", pmgr, time.time(), items)
        return uids

    def submit_units(self, umgr: str, descs: list[dict[str, Any]]) -> list[str]:
        uids = [self.hub.next_uid("unit") for _ in descs]
        items = list(zip(uids, descs, strict=True))
        self._post(self.hub.submit_units, umgr, items)
        self._journal("units", umgr, time.time(), items)
        return uids

    def add_pilots(self, umgr: str, pilots: list[str]) -> None:
        self._post(self.hub.add_pilots, umgr, pilots)
        self._journal("add", umgr, pilots)

    def remove_pilots(self, umgr: str, pilots: list[str]) -> None:
        self._post(self.hub.remove_pilots, umgr, pilots)
        self._journal("remove", umgr, pilots)

    def cancel_units(self, uids: list[str] | None, umgr: str | None) -> None:
        self._post(self.hub.cancel_units, uids, umgr)
        self._journal("cancel_units", uids, umgr)

    def cancel_pilots(self, uids: list[str] | None, pmgr: str | None) -> None:
        self._post(self.hub.cancel_pilots, uids, pmgr)
        self._journal("cancel_pilots", uids, pmgr)

    def events(self, after: int, limit: int, wait: float) -> tuple[list[Event], bool]:
        """Events after number ``after`` and whether the stream has ended with them (of a
        journaled session, those written)."""
        return self.hub.events.read(after, min(limit, EVENTS_MAX), wait)

    def snapshot(self) -> dict[str, Any]:
        """On the hub loop; a closed session's once its hub has stopped (its records no longer
        change then)."""
        if self.hub.closed:
            self.hub.wait_stopped(120.0)
            snap = self.hub.snapshot()
        else:
            snap = self.hub.call(self.hub.snapshot)
        snap["seq"] = self.hub.events.visible()  # at least this much of the stream is reflected
        return snap

    def stats(self) -> dict[str, Any]:
        return self.hub.call(self.hub.stats)

    def read_output(self, uid: str, name: str, offset: int, limit: int) -> dict[str, Any]:
        """A chunk of a unit's sandbox file (``Unit.follow``); see Hub.read_output."""
        return self.hub.call(self.hub.read_output, uid, name, offset, limit, timeout=60.0)
