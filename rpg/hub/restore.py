"""A hub service session brought back from its journal (rpg/hub/journal.py) after a crash.

``rebuild`` (before the hub binds its agents' endpoint, so that an agent calling in finds its
pilot) makes the records as the journal left them: managers, pilots and units from the
requests, their states, pilots, sandboxes, reasons and restart counts from the events, the
bookkeeping (cores bound, units in flight, counts) from those. ``resume`` (on the hub loop,
once it runs) sets them going again:

- a pilot never launched is launched; one that was launching fails ("the hub restarted while it
  was being launched"); one that was pending or active is adopted (PilotLifecycle.adopt): its
  agent calls in again within its heartbeat timeout, or the pilot ends (heartbeat lost, or its
  local process found gone) and its units with it, as when any agent dies: FAILED with the
  reason, or moved to another pilot if they had not started or are restartable;
- an adopted agent is asked which units it holds (``resync``): a unit the journal has at that
  agent but the agent does not hold never reached it (its pull's reply was lost with the hub),
  so it starts over at NEW, and no unit runs twice;
- units waiting for a pilot wait again; cancels the application asked for are made again.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import TYPE_CHECKING

import gevent

from rpg import states
from rpg.hub.journal import Restored
from rpg.hub.lifecycle import PilotLifecycle
from rpg.hub.records import PilotRecord, UnitRecord
from rpg.io_pool import yield_to_loop
from rpg.states import Why

if TYPE_CHECKING:
    from rpg.hub.hub import Hub

SLICE = 2000  # units set going per slice (yield_to_loop)


def rebuild(hub: "Hub", r: Restored) -> None:
    led = hub.ledger
    hub._uids = itertools.count(r.last_uid + 1)
    hub.managers.update(r.managers)
    for uid, (pmgr, desc, token, created) in r.pilots.items():
        sandbox = desc.get("sandbox") or os.path.join(hub.sandbox, uid)
        p = led.pilots[uid] = PilotRecord(uid, pmgr, desc, token, sandbox)
        p.created = created
    for uid, (umgr, desc, created) in r.units.items():
        u = led.units[uid] = UnitRecord(uid, umgr, desc)
        u.created = created
    for kind, uid, state, ts, fields in r.events:
        if kind == "unit":
            u = led.units.get(uid)
            if u is not None:
                _unit_event(u, state, fields)
        else:
            p = led.pilots.get(uid)
            if p is not None:
                _pilot_event(p, state, ts, fields)
    now = time.time()
    for p in led.pilots.values():
        p.last_seen = now  # its agent has a heartbeat timeout from now to call again
        if p.state == states.ACTIVE:
            p.registered.set()
    for u in led.units.values():
        led.unit_counts[u.state] += 1
        if states.is_final(u.state):
            led.units_final += 1
        elif u.state != states.NEW and u.pilot in led.pilots:
            p = led.pilots[u.pilot]
            p.in_flight.add(u.uid)
            p.load_cores += int(u.desc["cores"])
            u.at_agent = True  # a pull's hand-over is journaled before its reply
    hub.binding.umgr_pilots.update({m: list(ps) for m, ps in r.umgr_pilots.items()})


def _unit_event(u: UnitRecord, state: str, fields: dict) -> None:
    u.state = state
    if state == states.NEW:  # it started over
        u.pilot = None
        u.restarts = int(fields.get("restarts") or u.restarts)
        if fields.get("reason_code") == Why.RETRY.value:
            u.retried = int(fields.get("retried") or u.retried)
            u.avoid = fields.get("failed_on")
    elif state == states.BOUND:
        u.pilot = fields.get("pilot")
    if "sandbox" in fields:
        u.sandbox = fields["sandbox"]
    if states.is_final(state):
        u.reason = fields.get("reason")
        u.reason_code = fields.get("reason_code")
        for k in ("exit_code", "stdout", "stderr"):
            if k in fields:
                setattr(u, k, fields[k])


def _pilot_event(p: PilotRecord, state: str, ts: float, fields: dict) -> None:
    p.state = state
    if "sandbox" in fields:
        p.sandbox = fields["sandbox"]
    if state == states.ACTIVE:
        p.agent_info = {k: fields[k] for k in ("pid", "host") if k in fields}
        runtime = float(p.desc.get("runtime") or 0) * 60.0
        p.ends_at = ts + runtime if runtime > 0 else None
    if states.is_final(state):
        p.reason = fields.get("reason")
        p.reason_code = fields.get("reason_code")


def resume(hub: "Hub", r: Restored) -> None:
    """On the hub loop, after start."""
    led = hub.ledger
    adopted = 0
    for p in led.pilots.values():
        if states.is_final(p.state):
            continue
        if p.state == states.NEW:
            p.greenlet = gevent.spawn(PilotLifecycle(hub, p).run)
        else:
            p.resync = p.state != states.LAUNCHING
            p.greenlet = gevent.spawn(PilotLifecycle(hub, p).adopt)
            adopted += 1
    waiting = 0
    for i, u in enumerate(list(led.units.values())):
        if i and i % SLICE == 0:
            yield_to_loop()
        if u.state == states.NEW:
            hub.binding.wait(u)
            waiting += 1
    for umgr in list(hub.binding.umgr_pilots):
        hub.binding.wake(umgr)
    for uid in r.canceled_units:
        u = led.units.get(uid)
        if u is not None and not states.is_final(u.state):
            hub.cancel_unit(u, Why.CANCELED)
    live = [uid for uid in r.canceled_pilots if uid in led.pilots
            and not states.is_final(led.pilots[uid].state)]
    if live:
        hub.cancel_pilots(live)
    hub.log.info("session_restored", units=len(led.units), pilots=len(led.pilots),
                 adopted=adopted, waiting=waiting, events=len(r.events), torn_bytes=r.torn)


def resynced(hub: "Hub", p: PilotRecord, held: set[str]) -> int:
    """An adopted agent said which units it holds: those the journal has at it that it does
    not hold never reached it; they start over. Returns how many."""
    p.resync = False
    lost = [hub.units[uid] for uid in list(p.in_flight)
            if uid in hub.units and uid not in held and hub.units[uid].at_agent
            and not states.is_final(hub.units[uid].state)]
    for u in lost:
        if u.cancel_reason is not None:
            hub.ledger.end_unit(u, states.CANCELED, "hub", u.cancel_why, u.cancel_reason)
        else:
            hub.moves.restart(u, f"its hand-over to pilot {p.uid} was lost when the hub "
                                f"restarted")
    if lost:
        hub.log.warning("units_lost_in_restart_moved", pilot=p.uid, count=len(lost))
    return len(lost)
