"""The hub's records of units and pilots, and the Ledger: the one place they change state.

Lifecycles, the agent service and launchers never set a record's state themselves: they ask the
Ledger, which checks every step against the table in ``rpg.states`` (an illegal one raises
``IllegalTransition``), writes it to the profile, hands it to the session's event stream (each
state once, in order: skipped ones are filled in), and keeps the pilot bookkeeping of a unit
(cores bound, units in flight) in one place. Owned by the hub loop only.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

from gevent.event import Event

from rpg import states
from rpg.states import Why


class UnitRecord:
    __slots__ = ("uid", "umgr", "desc", "state", "pilot", "greenlet", "reason", "reason_code",
                 "exit_code", "stdout", "stderr", "sandbox", "at_agent", "cancel_reason",
                 "cancel_why", "restarts", "retried", "avoid", "created")

    def __init__(self, uid: str, umgr: str, desc: dict[str, Any]) -> None:
        self.uid = uid
        self.umgr = umgr
        # The record owns the description it is given (a submit's own copy), and keeps its
        # lists as tuples (read-only here; sent as arrays all the same): a tuple of strings,
        # or an empty one, is not walked by the application's full collections, and four
        # lists a unit (arguments, pre_exec, the staging directives) were a quarter of what
        # 10,000 units made them walk. Changed in place: a copy of the dict (832 bytes, from
        # malloc) left the freed originals' holes behind, 0.8 MB more RSS a 1,000 units.
        for k, v in desc.items():
            if type(v) is list:
                desc[k] = tuple(v)
        self.desc = desc
        self.state = states.NEW
        self.pilot: str | None = None
        self.greenlet: Any = None  # only while the hub moves its client:// files (lifecycle.py)
        self.reason: str | None = None
        self.reason_code: str | None = None
        self.exit_code: int | None = None
        self.stdout: str | None = None
        self.stderr: str | None = None
        self.sandbox: str | None = None
        self.at_agent = False  # handed to the agent (pulled); cancel must go through it
        self.cancel_reason: str | None = None
        self.cancel_why: Why | None = None
        self.restarts = 0
        self.retried = 0  # failed attempts run again (UnitDescription.retries)
        self.avoid: str | None = None  # the pilot its last attempt failed on (binding.py)
        self.created = 0.0


class Pace:
    """Cores a pilot's units free per second: the rate of the last window of WINDOW_S or more
    (a window closes at the first free after WINDOW_S), or of the current one once it has run
    twice that long (a stall). Times PREFETCH_S, what a pilot gets through while a pull and a
    push go round (binding.py). Hub loop only."""

    __slots__ = ("rate", "start", "cores")
    WINDOW_S = 0.5

    def __init__(self) -> None:
        self.rate = 0.0
        self.start = time.monotonic()
        self.cores = 0

    def add(self, cores: int) -> None:
        self.cores += cores
        now = time.monotonic()
        if now - self.start >= self.WINDOW_S:
            self.rate = self.cores / (now - self.start)
            self.start, self.cores = now, 0

    def per_s(self) -> float:
        """The rate, with a stall seen: a window twice its length without frees counts."""
        now = time.monotonic()
        if now - self.start >= 2 * self.WINDOW_S:
            return self.cores / (now - self.start)
        return self.rate


class PilotRecord:
    __slots__ = ("uid", "pmgr", "desc", "state", "token", "sandbox", "queue", "in_flight",
                 "cancels", "wake", "last_seen", "registered", "launcher", "greenlet",
                 "load_cores", "agent_info", "stopping", "reason", "reason_code",
                 "final_state_hint", "final_why", "stop_reason", "ends_at", "ending", "resync",
                 "pull_seq", "unacked", "created", "pace")

    def __init__(self, uid: str, pmgr: str, desc: dict[str, Any], token: str,
                 sandbox: str) -> None:
        self.uid = uid
        self.pmgr = pmgr
        self.desc = desc
        self.state = states.NEW
        self.token = token
        self.sandbox = sandbox
        self.queue: deque[str] = deque()  # bound and client-staged in, not yet pulled
        self.in_flight: set[str] = set()  # bound here, not final (at_agent: pulled)
        self.cancels: list[str] = []  # to tell the agent on its next pull
        self.wake = Event()  # wakes the agent's long poll
        self.last_seen = 0.0
        self.registered = Event()
        self.launcher: Any = None
        self.greenlet: Any = None
        self.load_cores = 0  # cores of units bound here and not final (binding.py's room)
        self.pace = Pace()  # cores its units free per second: binding.py's prefetch follows it
        self.agent_info: dict[str, Any] = {}
        self.stopping = False  # the hub asked the agent to shut down
        self.ending = False  # its agent said it is ending (a unit ended under it): no more units
        self.resync = False  # adopted after a hub restart: ask its agent which units it holds
        # The last pull reply (rpg/hub/service.py): its number, and the units and cancels it
        # carried, sent again if the agent's next pull says it never got that reply.
        self.pull_seq = 0
        self.unacked: tuple[list[str], list[str]] = ([], [])
        self.reason: str | None = None
        self.reason_code: str | None = None
        self.final_state_hint: str | None = None  # how it ends when its greenlet is killed
        self.final_why: Why | None = None
        self.stop_reason = ""  # told to the agent with "shutdown"; its units end with it
        self.ends_at: float | None = None  # when its runtime runs out (set as it calls in)
        self.created = time.time()

    @property
    def cores(self) -> int:
        return int(self.desc["cores"])

    def time_left(self) -> float | None:
        """Seconds until its runtime runs out (its whole runtime before it called in); None if
        it has no runtime limit."""
        limit = float(self.desc.get("runtime") or 0) * 60.0
        if limit <= 0:
            return None
        return limit if self.ends_at is None else self.ends_at - time.time()

    def active(self) -> bool:
        return not states.is_final(self.state) and not self.stopping and not self.ending


class Ledger:
    """Every unit and pilot record of one hub, and every change of their states."""

    def __init__(self, profile: Any, events: Any) -> None:
        self.profile = profile
        self.events = events
        self.released: Any = None  # called with a pilot when a unit no longer counts on it
        # called with (unit, why, reason, fields) before a unit would end FAILED: True if it
        # runs again instead (the hub's retries), and then it has not ended
        self.retry: Any = None
        self.units: dict[str, UnitRecord] = {}
        self.pilots: dict[str, PilotRecord] = {}
        self.units_final = 0  # units that reached a final state (a service's in-flight limit)
        # Units by state, kept as they move (O(1) a step): what the dashboard shows, never
        # counted over all units. And the latest failures with their reasons.
        self.unit_counts: Counter[str] = Counter()
        self.failures: deque[tuple[float, str, str | None, str | None]] = deque(maxlen=50)

    # -- records ---------------------------------------------------------------------------------

    def new_unit(self, uid: str, umgr: str, desc: dict[str, Any], ts: float) -> UnitRecord:
        rec = self.units[uid] = UnitRecord(uid, umgr, desc)
        rec.created = ts
        self.unit_counts[states.NEW] += 1
        self.profile.add(ts, uid, states.NEW, "hub")
        return rec

    def new_pilot(self, uid: str, pmgr: str, desc: dict[str, Any], token: str,
                  sandbox: str) -> PilotRecord:
        rec = self.pilots[uid] = PilotRecord(uid, pmgr, desc, token, sandbox)
        self.profile.add(rec.created, uid, states.NEW, "hub", resource=desc["resource"],
                         cores=desc["cores"])
        return rec

    # -- state changes ---------------------------------------------------------------------------

    def move(self, kind: str, rec: Any, new: str, component: str, ts: float | None = None,
             **fields: Any) -> None:
        """Move ``rec`` to ``new`` (filling skipped states), each step checked by the table and
        delivered once. Raises IllegalTransition for a step the table does not allow."""
        steps = states.path(kind, rec.state, new)
        ts = ts or time.time()
        counts = self.unit_counts if kind == "unit" else None
        for st in steps:
            if counts is not None:
                counts[rec.state] -= 1
                counts[st] += 1
            rec.state = st
            extra = fields if st == new else {}
            # A function unit's results are the application's data, not the profile's.
            prof = extra if "results" not in extra else \
                {k: v for k, v in extra.items() if k != "results"}
            self.profile.add(ts, rec.uid, st, component, **prof)
            self.events.put((kind, rec.uid, st, ts, extra))

    def bind(self, unit: UnitRecord, pilot: PilotRecord) -> None:
        unit.pilot = pilot.uid
        cores = int(unit.desc["cores"])
        pilot.load_cores += cores
        pilot.in_flight.add(unit.uid)
        # rpg report's utilization: a unit's cores, when not the default 1
        extra = {"cores": cores} if cores != 1 else {}
        self.move("unit", unit, states.BOUND, "hub", pilot=pilot.uid, **extra)

    def _release(self, unit: UnitRecord) -> None:
        """The unit no longer counts on its pilot (it ended, or starts over)."""
        pilot = self.pilots.get(unit.pilot) if unit.pilot else None
        if pilot is not None:
            cores = int(unit.desc["cores"])
            pilot.in_flight.discard(unit.uid)
            pilot.load_cores -= cores
            pilot.pace.add(cores)
            if self.released is not None:
                self.released(pilot)

    def end_unit(self, unit: UnitRecord, state: str, component: str, why: Why | None,
                 reason: str | None = None, ts: float | None = None, **fields: Any) -> bool:
        """End a unit: its fields, the final event, its pilot's bookkeeping. False (and
        nothing done) if it had ended already."""
        if states.is_final(unit.state):
            return False
        if state == states.FAILED and self.retry is not None and \
                self.retry(unit, why, reason if reason is not None else fields.get("reason"),
                           fields):
            return False
        if reason is not None:
            unit.reason = fields["reason"] = reason
        if why is not None:
            unit.reason_code = fields["reason_code"] = why.value
        for k in ("exit_code", "stdout", "stderr", "sandbox"):
            if k in fields:
                setattr(unit, k, fields[k])
        self.move("unit", unit, state, component, ts=ts, **fields)
        self.units_final += 1
        if state == states.FAILED:
            self.failures.append((ts or time.time(), unit.uid, unit.pilot, unit.reason))
        self._release(unit)
        return True

    def restart_unit(self, unit: UnitRecord, reason: str, retry: dict[str, Any] | None = None
                     ) -> None:
        """A unit goes back to NEW (the table's one backward edge): its pilot ended under it, or
        (``retry``: what its failed attempt left, exit code and files) it failed and has retries
        left. The hub queues it for another pilot (rpg/hub/moves.py)."""
        states.check_restart("unit", unit.state)
        self._release(unit)
        failed_on = unit.pilot
        unit.pilot = None
        unit.at_agent = False
        unit.restarts += 1
        self.unit_counts[unit.state] -= 1
        self.unit_counts[states.NEW] += 1
        unit.state = states.NEW
        ts = time.time()
        fields: dict[str, Any]
        if retry is None:
            fields = {"reason": f"restarting: {reason}", "reason_code": Why.RESTART.value,
                      "restarts": unit.restarts}
        else:
            unit.retried += 1
            unit.avoid = failed_on
            fields = {"reason": f"retry {unit.retried} of {unit.desc.get('retries')}: {reason}",
                      "reason_code": Why.RETRY.value, "restarts": unit.restarts,
                      "retried": unit.retried, "failed_on": failed_on}
            fields.update((k, retry[k]) for k in ("exit_code", "stdout", "stderr", "sandbox")
                          if k in retry)
        self.profile.add(ts, unit.uid, states.NEW, "hub", **fields)
        self.events.put(("unit", unit.uid, states.NEW, ts, fields))

    def end_pilot(self, pilot: PilotRecord, state: str, why: Why | None,
                  reason: str | None) -> None:
        pilot.reason = reason
        pilot.reason_code = why.value if why is not None else None
        if not states.is_final(pilot.state):
            fields: dict[str, Any] = {"reason": reason}
            if why is not None:
                fields["reason_code"] = why.value
            self.move("pilot", pilot, state, "hub", **fields)
