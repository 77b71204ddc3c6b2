"""Where a unit goes when its attempt ends badly: the agent's word on a unit that did not
finish (not started, drained, its pilot's walltime or end), a failure with retries left, a bound
unit whose pilot ended before it got there. Each either starts over on another pilot that fits
(``restart``: back to NEW, at the head of its queue, rpg/hub/binding.py) or ends with the right
state and reason code. The hub's one owner of these decisions; it runs on the hub loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rpg import states
from rpg.hub.records import UnitRecord
from rpg.states import Why

if TYPE_CHECKING:
    from rpg.hub.hub import Hub

HUB_STOPS = frozenset({Why.CANCELED, Why.SESSION_CLOSED, Why.HUB_STOPPED})
CLOSING = frozenset({Why.SESSION_CLOSED, Why.HUB_STOPPED})  # units end, they do not move
# A retry would end the same way; a walltime's unit moved already if it could, and never
# counts against its retries (walltime_moves).
NOT_RETRIED = frozenset({Why.NO_PILOT, Why.UNSENDABLE, Why.PILOT_WALLTIME}) | HUB_STOPS


class Moves:
    """The hub's decisions on where a unit goes after a bad end (see the module's words)."""

    def __init__(self, hub: "Hub") -> None:
        self.hub = hub

    def end_as_agent_said(self, unit: UnitRecord, state: str, ts: float,
                               fields: dict[str, Any]) -> None:
        fields = dict(fields)
        code = fields.pop("reason_code", None)
        why = Why(code) if code else (None if state == states.DONE else Why.AGENT)
        pilot = self.hub.pilots.get(unit.pilot) if unit.pilot else None
        hub_ends_it = pilot is not None and pilot.stopping
        if pilot is not None and why in (Why.NOT_STARTED, Why.PILOT_ENDED, Why.PILOT_WALLTIME):
            # The agent is ending (its runtime ran out, a signal) though the hub has not heard
            # yet: it takes no more units, so a unit moved now goes elsewhere.
            pilot.ending = True
        if why == Why.DRAINED:
            # Its runtime would overrun what its pilot has left (the pilot goes on): to a pilot
            # with the time, if one of its manager's has it; else it ends "pilot walltime".
            if (unit.cancel_reason is None and not hub_ends_it
                    and self.hub.binding.could_run_elsewhere(unit)):
                self.restart(unit, f"not started on pilot {unit.pilot}: "
                                        f"{fields.get('reason')}")
                return
            why = Why.PILOT_WALLTIME
        if why == Why.NOT_STARTED:
            # Its pilot ended before the agent started it: it goes to another pilot if one can
            # take it (and the application is not ending it), else ends as the pilot's unit.
            if (unit.cancel_reason is None and not (hub_ends_it and pilot.final_why in CLOSING)
                    and self.hub.binding.could_run_elsewhere(unit)):
                self.restart(unit, f"its pilot {unit.pilot} ended before it started: "
                                        f"{fields.get('reason')}")
                return
            why = Why.PILOT_ENDED
        if (why == Why.PILOT_WALLTIME and unit.cancel_reason is None
                and not (hub_ends_it and pilot.final_why in CLOSING)
                and self.walltime_moves(unit)):
            self.restart(unit, f"pilot {unit.pilot} walltime: {fields.get('reason')}")
            return
        if (why == Why.PILOT_ENDED and unit.desc.get("restartable") and unit.cancel_reason is None
                and not (hub_ends_it and pilot.final_why in CLOSING)
                and self.hub.binding.could_run_elsewhere(unit)):
            self.restart(unit, f"its pilot {unit.pilot} ended under it: "
                                    f"{fields.get('reason')}")
            return
        if why in (Why.PILOT_ENDED, Why.PILOT_WALLTIME) and state == states.FAILED \
                and hub_ends_it and pilot.final_why in HUB_STOPS:
            # The agent failed it as its pilot ended under it (scancel's SIGTERM, say), but the
            # hub was ending that pilot: the application's cancel or close, as if it had heard.
            state, why = states.CANCELED, pilot.final_why
            fields["reason"] = f"{pilot.stop_reason}; the agent said: {fields.get('reason')}"
        if state == states.CANCELED and why in (Why.AGENT, Why.PILOT_ENDED) and \
                (unit.cancel_why is not None or hub_ends_it):
            # The agent canceled it because the hub asked: the hub's code, not the agent's.
            why = unit.cancel_why or pilot.final_why or why
        self.hub.ledger.end_unit(unit, state, "agent", why, ts=ts, **fields)

    def walltime_moves(self, unit: UnitRecord) -> bool:
        """Its pilot's time ran out under it, or would have: does it go to another pilot (one
        with the time)? One that had not started does; one that ran does if it may run again
        (restartable, or retries: a walltime never counts against those)."""
        started = unit.state in (states.EXECUTING, states.STAGING_OUT)
        may = not started or unit.desc.get("restartable") or unit.desc.get("retries")
        return bool(may) and self.hub.binding.could_run_elsewhere(unit)

    def restart(self, unit: UnitRecord, reason: str) -> None:
        """A unit whose pilot ended under it, and that may run again, waits for another."""
        self.hub.ledger.restart_unit(unit, reason)
        self.hub.binding.wait(unit, first=True)
        self.hub.binding.wake(unit.umgr)

    def retry(self, unit: UnitRecord, why: Why | None, reason: str | None,
               fields: dict[str, Any]) -> bool:
        """The Ledger asks before a unit ends FAILED: does it run again (it has retries left,
        and some live pilot of its manager fits it)? Then it starts over at NEW, at the head
        of its queue, and avoids the pilot it failed on while another one can take it
        (binding.py). Not retried: a unit the application is canceling, one that no pilot can
        run or whose description cannot be sent (it would fail the same way), one that has not
        started yet (NEW) or whose session is closing."""
        if unit.retried >= int(unit.desc.get("retries") or 0) or unit.cancel_reason is not None:
            return False
        if why in NOT_RETRIED or unit.state not in states.RESTARTABLE_FROM:
            return False
        pilot = self.hub.pilots.get(unit.pilot) if unit.pilot else None
        if pilot is not None and pilot.stopping and pilot.final_why in CLOSING:
            return False
        if not self.hub.binding.could_run(unit):
            return False  # nothing left to run it: it ends with its own reason
        self.hub.ledger.restart_unit(unit, reason or "failed", retry=fields)
        self.hub.binding.wait(unit, first=True)
        self.hub.binding.wake(unit.umgr)
        return True

    def left_pilot(self, unit: UnitRecord, reason: str) -> None:
        """A bound unit that never reached its agent, whose pilot ended: elsewhere, or ended."""
        if unit.cancel_reason is None and self.hub.binding.could_run_elsewhere(unit):
            self.restart(unit, reason)
        else:
            self.hub.ledger.end_unit(unit, states.FAILED if unit.cancel_reason is None
                                 else states.CANCELED, "hub", Why.PILOT_ENDED, reason)
