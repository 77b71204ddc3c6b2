"""How the agent's units end when they are canceled or the pilot stops.

``UnitEnding`` is a part of ``Agent`` (rpg/agent/agent.py), kept here as ``HubLink`` is, so that
each concept fits one file. It uses the agent's units (``units``: a greenlet or a
``PlainUnit`` each, both ended by ``kill()``), ``running``, ``signaled``, ``cancel_reasons``,
``stop_info``, ``kill_grace``, ``report``, ``log`` and ``_escalations``.

- ``cancel_unit``: a unit whose process runs gets SIGTERM (its exit ends it); any other is
  killed where it waits. ``escalate_later`` SIGKILLs what SIGTERM left after ``kill_grace``.
- ``_stop_units``: the pilot's stop ends every unit held and waits for their reports; one whose
  exit is not seen is killed a second time, which reports it at once.
- ``report_ended``: the one owner of how a stopped unit is reported, for both kinds of unit.
"""

from __future__ import annotations

import signal
from typing import Any

import gevent
from gevent import GreenletExit

from rpg import states
from rpg.agent.unit_process import KILL_WAIT_S, UnitProcess

# How long a stop waits, after ``kill_grace``, for the units' SIGKILLed groups to be seen to
# exit. A unit whose exit is not seen by then (a process in D state on a dead disk, a stalled
# spawner) is reported there, with no exit code, so that the final push carries it.
STOP_WAIT_S = 10.0


class UnitEnding:
    """Cancel, stop and the reports of units so ended (see the module)."""

    def cancel_unit(self, uid: str, state: str, reason: str, signaled: list[Any]) -> None:
        """End one unit as ``state``. One whose process runs gets SIGTERM, and its greenlet,
        which waits for the exit, ends it there (added to ``signaled``: pass them all to
        ``escalate_later``). Anything else is killed where it waits. Why not kill them all:
        4,000 cancels at once were an exception thrown into each greenlet and a second wait
        with a timer in each, about 57 us of loop each, while the dying processes took both
        cores: the agent's loop lag p99 was made in that half second."""
        g = self.units.get(uid)
        if g is None:
            return
        self.cancel_reasons.setdefault(uid, (state, reason))
        proc = self.running.get(uid)
        if proc is None:
            g.kill(block=False)
        elif uid not in self.signaled:
            self.signaled.add(uid)
            proc.signal_group(signal.SIGTERM)
            signaled.append(proc)

    def escalate_later(self, procs: list[Any]) -> None:
        """SIGKILL the groups a cancel's SIGTERM has not ended after ``kill_grace``; a unit that
        not even that ends within KILL_WAIT_S is killed where it waits (as any other)."""
        def escalate() -> None:
            try:
                gevent.sleep(self.kill_grace)
                left = [p for p in procs if p.returncode is None and p.error is None]
                for p in left:
                    p.signal_group(signal.SIGKILL)
                if left:
                    gevent.sleep(KILL_WAIT_S)
                    for p in left:
                        g = self.units.get(p.uid)
                        if p.returncode is None and p.error is None and g is not None:
                            g.kill(block=False)
            finally:
                self._escalations.discard(gevent.getcurrent())

        self._escalations.add(gevent.spawn(escalate))

    def _stop_units(self, unit_state: str, reason: str) -> None:
        """End every unit held (as ``unit_state``, ``reason``) and wait for their reports. A
        unit whose SIGKILLed group is not seen to exit within ``kill_grace`` + STOP_WAIT_S is
        killed a second time, which reports it at once with no exit code seen (both paths):
        no unit the stop ended is left out of the final push."""
        for uid, g in list(self.units.items()):
            self.cancel_reasons.setdefault(uid, (unit_state, reason))
            g.kill(block=False)
        gevent.joinall(list(self.units.values()), timeout=self.kill_grace + STOP_WAIT_S)
        left = list(self.units.items())
        if left:
            self.log.warning("units_not_seen_to_exit", units=len(left), first=left[0][0],
                             waited_s=self.kill_grace + STOP_WAIT_S)
            for _, g in left:
                g.kill(block=False)
            gevent.joinall([g for _, g in left], timeout=STOP_WAIT_S)

    def _unit_gone(self, uid: str, g: Any) -> None:
        """A unit's greenlet ended. One killed before its first step never ran its body, so
        nothing reported it: it is reported here, as a kill before its start."""
        if self.units.get(uid) is g:
            self.report_ended(uid, False, None)
            self.units.pop(uid, None)
            self.cancel_reasons.pop(uid, None)
            self.signaled.discard(uid)

    def _terminate(self, child: UnitProcess | None) -> int | None:
        """End a unit's process (SIGTERM, SIGKILL after ``kill_grace``); its exit code, if
        seen. A second kill while it waits (a cancel, the escalation, the agent's stop) sends
        SIGKILL and returns at once: the unit is reported all the same."""
        if child is None:
            return None
        try:
            return child.terminate(grace=self.kill_grace)
        except GreenletExit:
            child.signal_group(signal.SIGKILL)
            return child.returncode

    def report_ended(self, uid: str, started: bool, rc: int | None) -> None:
        """Report a unit that a cancel or the pilot's end stopped (``rc``: its exit code, if
        its process ran and was seen to exit)."""
        state, reason = self.cancel_reasons.get(uid, (states.CANCELED, "canceled"))
        if self.stop_info is not None and self.stop_info[0] == "runtime":
            # Its walltime: the hub moves it if it had not started (or may run again).
            self.report(uid, state, reason=reason, exit_code=rc, reason_code="pilot_walltime")
        elif not started and self.stop_info is not None:
            # The pilot ends before it ran: the hub may give it to another pilot.
            self.report(uid, state, reason=reason, reason_code="not_started")
        elif self.stop_info is not None:
            # The pilot ended under it (shutdown, a signal): the hub knows whether that was
            # the application's cancel (then it ends CANCELED), or whether the unit may run
            # again elsewhere (restartable).
            self.report(uid, state, reason=reason, exit_code=rc, reason_code="pilot_ended")
        else:
            self.report(uid, state, reason=reason, exit_code=rc)
