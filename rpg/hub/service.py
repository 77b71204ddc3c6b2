"""The hub's zerorpc service: what agents call, in bulk, with their pilot's secret token.

Every call names its pilot and carries the token; the token is checked (constant time) before
anything is touched, and every payload is validated before use. A bad call gets a clear error
back (zerorpc raises it as RemoteError in the caller) and changes nothing.
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

from rpg import calls, states
from rpg.hub.journal import JournalError
from rpg.io_pool import yield_to_loop
from rpg.log import SparseWarning
from rpg.staging.directives import without_client_staging
from rpg.states import Why

if TYPE_CHECKING:
    from rpg.hub.hub import Hub
    from rpg.hub.records import PilotRecord

MAX_PULL = 5000
MAX_PUSH = 20000
MAX_WAIT_S = 5.0
MAX_TEXT = 1 << 20
YIELD_EVERY = 50  # updates of a push applied per slice (yield_to_loop; see PUSH_BATCH, hub_link.py)
UNIT_FIELDS = {"exit_code": int, "stdout": str, "stderr": str, "reason": str, "sandbox": str,
               "reason_code": str, "results": list}
PULL_BYTES = 24 << 20  # function payloads a pull hands out (but always one unit)
REASON_CODES = frozenset(w.value for w in Why)
JOURNAL_WAIT_S = 10.0  # a reply waits this long at most for the journal (below the agent's
# call timeout), then goes out unjournaled, and says so in the log


class ProtocolError(ValueError):
    """A malformed or unauthorized call (from an agent, or a client of the hub service)."""


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ProtocolError(msg)


class HubService:
    def __init__(self, hub: "Hub") -> None:
        self._hub = hub
        self.counters = {"register": 0, "pull": 0, "push": 0, "updates": 0, "rejected": 0,
                         "resync": 0, "resent": 0}
        self._warn_rejected = SparseWarning(hub.log, "rpc_rejected")
        self._warn_journal = SparseWarning(hub.log, "journal_behind")

    # -- checks ----------------------------------------------------------------------------------

    def _pilot(self, pilot_uid: Any, token: Any) -> "PilotRecord":
        try:
            require(isinstance(pilot_uid, str) and len(pilot_uid) < 256,
                   "pilot_uid must be a string")
            require(isinstance(token, str) and len(token) < 1024, "token must be a string")
            p = self._hub.pilots.get(pilot_uid)
            # Compare against a dummy when the pilot is unknown, so timing tells nothing.
            expected = p.token if p is not None else "x" * 43
            ok = hmac.compare_digest(expected.encode(), token.encode())
            require(p is not None and ok, "unknown pilot or bad token")
            return p  # type: ignore[return-value]
        except ProtocolError as exc:
            self.counters["rejected"] += 1
            self._warn_rejected(pilot=str(pilot_uid)[:64], error=str(exc))
            raise

    def _reject(self, p: "PilotRecord", msg: str) -> None:
        self.counters["rejected"] += 1
        self._warn_rejected(pilot=p.uid, error=msg)
        raise ProtocolError(msg)

    def _durable(self) -> None:
        """Write-ahead: a reply that tells the agent what the hub changed goes out once the
        session's journal (a hub service's, rpg/hub/journal.py) has it."""
        journal = self._hub.journal
        if journal is not None:
            try:
                journal.sync(JOURNAL_WAIT_S)
            except JournalError as exc:  # a full disk: the agents go on; a restart may lose this
                self._warn_journal(error=str(exc))

    # -- calls -----------------------------------------------------------------------------------

    def register(self, pilot_uid: str, token: str, info: dict) -> dict:
        """The agent calls in: the pilot becomes ACTIVE. Returns the agent's settings."""
        p = self._pilot(pilot_uid, token)
        if not isinstance(info, dict) or len(info) > 64:
            self._reject(p, "register: info must be a small dict")
        if states.is_final(p.state) or p.stopping:
            self._reject(p, f"register: pilot {p.uid} is {p.state}, not launching")
        self.counters["register"] += 1
        p.agent_info = {str(k)[:64]: v for k, v in info.items()
                        if isinstance(v, (str, int, float, bool, list))}
        p.last_seen = time.time()
        runtime = float(p.desc.get("runtime") or 0) * 60.0
        # The agent's runtime starts as this returns: an end reckoned here is a little early.
        p.ends_at = p.last_seen + runtime if runtime > 0 else None
        if p.state in (states.NEW, states.LAUNCHING, states.PENDING):
            self._hub.ledger.move("pilot", p, states.ACTIVE, "agent",
                           **{k: p.agent_info[k] for k in ("pid", "host") if k in p.agent_info})
        p.registered.set()
        self._durable()
        return {"ok": True, "pilot": p.uid}

    def pull(self, pilot_uid: str, token: str, max_units: int, wait_s: float,
             got: int | None = None) -> dict:
        """Hand out up to ``max_units`` units, bound to this pilot now, as its room allows
        (binding.py), and pending cancels (long poll ``wait_s``).

        Each reply has a number (``seq``); the agent's next pull says which it got last
        (``got``). A reply the agent never got (its connection dropped as the reply went out)
        is not lost: its units and cancels go again in this one. An agent that sends no
        ``got`` gets no such resend."""
        p = self._pilot(pilot_uid, token)
        if isinstance(max_units, bool) or not isinstance(max_units, int) or max_units < 0:
            self._reject(p, "pull: max_units must be an integer >= 0")
        if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or wait_s < 0:
            self._reject(p, "pull: wait_s must be a number >= 0")
        if got is not None and (isinstance(got, bool) or not isinstance(got, int) or got < 0):
            self._reject(p, "pull: got must be an integer >= 0 (the last reply's seq)")
        self.counters["pull"] += 1
        p.last_seen = time.time()
        max_units = min(max_units, MAX_PULL)
        if not p.stopping and not p.cancels and not self._lost(p, got) and not (
                max_units and p.active() and (p.queue or self._hub.binding.ready(p))):
            p.wake.clear()
            p.wake.wait(min(float(wait_s), MAX_WAIT_S))
            p.last_seen = time.time()
        return self._work(p, max_units, got)

    @staticmethod
    def _lost(p: "PilotRecord", got: int | None) -> bool:
        """Did the agent miss the last reply, which carried units or cancels?"""
        return got is not None and got != p.pull_seq and bool(p.unacked[0] or p.unacked[1])

    def _work(self, p: "PilotRecord", max_units: int, got: int | None = None) -> dict:
        hub = self._hub
        out = []
        # An agent on another machine cannot reach client:// paths: the hub moves those.
        strip = p.launcher is not None and p.launcher.client_staging is not None
        size = 0

        def give(unit: Any) -> None:
            nonlocal size
            unit.at_agent = True
            desc = without_client_staging(unit.desc) if strip else unit.desc
            payload = desc.get("payload")
            size += len(payload) if payload is not None else 0
            out.append({"uid": unit.uid, "description": desc})

        again: list[str] = []
        if self._lost(p, got):  # checked after the wait: a pull that ended meanwhile counts
            for uid in p.unacked[0]:
                unit = hub.units.get(uid)
                if unit is not None and uid in p.in_flight and unit.at_agent:
                    give(unit)
            again = [u for u in p.unacked[1] if u in p.in_flight]
            self.counters["resent"] += len(out) + len(again)
            hub.log.warning("pull_reply_resent", pilot=p.uid, units=len(out),
                            cancels=len(again), seq=p.pull_seq, got=got)
        if p.active():
            while p.queue and len(out) < max_units and size <= PULL_BYTES:
                unit = hub.units.get(p.queue.popleft())  # bound, its client:// files moved
                if unit is not None and not states.is_final(unit.state):
                    give(unit)
            if len(out) < max_units and size <= PULL_BYTES:
                for unit in hub.binding.take(p):
                    if hub.hand_over(p, unit):
                        give(unit)
                    if len(out) >= max_units or size > PULL_BYTES:
                        break
        cancels, p.cancels = p.cancels, []
        cancels = again + [u for u in cancels if u in p.in_flight and u not in again]
        p.pull_seq += 1
        p.unacked = ([u["uid"] for u in out], cancels)
        reply = {"units": out, "cancel": cancels, "shutdown": p.stopping and p.stop_reason,
                 "seq": p.pull_seq}
        if out:
            self._durable()  # their BOUND is written before the agent has them
        if p.resync:
            reply["resync"] = True  # a restarted hub asks which units the agent holds
        return reply

    def holding(self, pilot_uid: str, token: str, uids: list) -> dict:
        """An adopted agent's answer to ``resync``: every unit it holds (running, waiting for
        cores, or with updates not yet pushed). See rpg/hub/restore.py."""
        from rpg.hub.restore import resynced

        p = self._pilot(pilot_uid, token)
        if not isinstance(uids, list) or len(uids) > 10 * MAX_PUSH or \
                not all(isinstance(u, str) for u in uids):
            self._reject(p, "holding: uids must be a list of unit uids")
        p.last_seen = time.time()
        self.counters["resync"] += 1
        moved = resynced(self._hub, p, set(uids)) if p.resync else 0
        self._durable()
        return {"moved": moved}

    def push(self, pilot_uid: str, token: str, updates: list) -> dict:
        """State updates from the agent, in bulk: ``[[uid, state, time, {fields}], ...]``.

        Each update is validated on its own; a bad one is rejected with its reason and the
        others still apply. Doubles as the agent's heartbeat.
        """
        p = self._pilot(pilot_uid, token)
        if not isinstance(updates, list) or len(updates) > MAX_PUSH:
            self._reject(p, f"push: updates must be a list of at most {MAX_PUSH} items")
        self.counters["push"] += 1
        p.last_seen = time.time()
        hub = self._hub
        applied = 0
        errors: list[list[str]] = []
        for i, upd in enumerate(updates):
            if i and i % YIELD_EVERY == 0:
                yield_to_loop()  # a big batch must not hold the loop
            try:
                uid, state, ts, fields = self._valid_update(p, upd)
                unit = hub.units[uid]
                if states.is_final(state):
                    hub.agent_final(unit, state, ts, fields)
                else:
                    hub.ledger.move("unit", unit, state, "agent", ts=ts, **fields)
                applied += 1
            except (ProtocolError, states.IllegalTransition) as exc:
                errors.append([str(upd[0]) if isinstance(upd, list) and upd else f"#{i}",
                               str(exc)[:300]])
        self.counters["updates"] += applied
        if applied:
            self._durable()  # acknowledged once written: the agent drops what it sent
        if errors:
            self.counters["rejected"] += len(errors)
            hub.log.warning("push_updates_rejected", pilot=p.uid, count=len(errors),
                            first=errors[0])
        return {"applied": applied, "errors": errors,
                "shutdown": p.stopping and p.stop_reason}

    def _valid_update(self, p: "PilotRecord", upd: Any) -> tuple[str, str, float, dict]:
        """``upd`` checked (ProtocolError names what is wrong; IllegalTransition a step the
        table refuses): (uid, state, time, fields). The usual update, exactly as an agent
        sends it, is checked here without building the words of errors it does not have
        (each of the checks below formats its message before it tests); anything else takes
        the checks that name the problem."""
        if type(upd) is list and len(upd) == 4:
            uid, state, ts, fields = upd
            unit = self._hub.units.get(uid) if type(uid) is str else None
            if (unit is not None and unit.at_agent and uid in p.in_flight
                    and type(state) is str and state in AGENT_STATES
                    and type(ts) is float and ts > 0 and type(fields) is dict
                    and all(_plain_field(k, v) for k, v in fields.items())):
                states.path("unit", unit.state, state)  # raises IllegalTransition
                return uid, state, ts, fields
        return self._checked_update(p, upd)

    def _checked_update(self, p: "PilotRecord", upd: Any) -> tuple[str, str, float, dict]:
        require(isinstance(upd, list) and len(upd) == 4,
               "an update must be [uid, state, time, fields]")
        uid, state, ts, fields = upd
        require(isinstance(uid, str) and uid in self._hub.units, f"unknown unit {str(uid)[:64]!r}")
        require(uid in p.in_flight and self._hub.units[uid].at_agent,
                f"unit {uid} is not running on pilot {p.uid}")
        require(isinstance(state, str) and state in states.UNIT_STATES,
               f"unknown unit state {str(state)[:32]!r}")
        require(state not in (states.NEW, states.BOUND), f"the agent cannot set {state}")
        require(not isinstance(ts, bool) and isinstance(ts, (int, float)) and ts > 0,
               "time must be a positive number")
        require(isinstance(fields, dict), "fields must be a dict")
        clean = {}
        for k, v in fields.items():
            require(k in UNIT_FIELDS, f"unknown field {str(k)[:32]!r}")
            want = UNIT_FIELDS[k]
            require(isinstance(v, want) and not isinstance(v, bool) or v is None,
                   f"field {k} must be {want.__name__}")
            if isinstance(v, str):
                require(len(v) <= MAX_TEXT, f"field {k} is longer than {MAX_TEXT} characters")
            if k == "reason_code":
                require(v in REASON_CODES, f"unknown reason_code {str(v)[:32]!r}")
            if k == "results" and v is not None:
                _check_results(v)
            clean[k] = v
        unit = self._hub.units[uid]
        states.path("unit", unit.state, state)  # raises IllegalTransition
        return uid, state, float(ts), clean


AGENT_STATES = states.UNIT_STATES - {states.NEW, states.BOUND}  # what an agent may report


def _plain_field(key: str, value: Any) -> bool:
    """True if ``key: value`` is an update field that ``_checked_update`` takes as it is: a
    known field whose value has exactly its type (or is None), a text within MAX_TEXT, a
    known reason_code (never None). Results are always looked at in full."""
    want = UNIT_FIELDS.get(key)  # type: ignore[call-overload]
    if want is None or key == "results":
        return False
    if value is None:
        return key != "reason_code"  # which the full check refuses as unknown
    if type(value) is not want:
        return False
    if want is str:
        return len(value) <= MAX_TEXT and (key != "reason_code" or value in REASON_CODES)
    return True


def _check_results(results: list) -> None:
    """A function unit's outcomes: ``[[status, data, text, seconds], ...]`` (rpg/calls.py)."""
    require(len(results) <= calls.MAX_CALLS, f"results: more than {calls.MAX_CALLS}")
    for r in results:
        require(isinstance(r, list) and len(r) == 4 and r[0] in calls.STATUSES
                and (r[1] is None or isinstance(r[1], bytes)) and isinstance(r[2], str)
                and isinstance(r[3], (int, float)),
                "results: each must be [status, bytes or None, text, seconds]")
