"""PilotLifecycle, one greenlet per pilot on the hub loop, and ClientStagingSteps.

A pilot's lifecycle waits where it must (for the agent to call in, for its end), re-checks
after every wait, and keeps its cleanup in one try/finally: cancel is killing the greenlet, at
any point. Units have no greenlet of their own: a waiting unit is an entry in the binding's
queues (binding.py), a running one a record the agent's pushes move (service.py); only the
hub's client:// staging of a unit runs on a greenlet, for as long as it takes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import gevent
from gevent import GreenletExit

from rpg import states
from rpg.hub.launchers import LaunchError, launcher_for
from rpg.states import Why

if TYPE_CHECKING:
    from rpg.hub.hub import Hub
    from rpg.hub.records import PilotRecord, UnitRecord


class ClientStagingSteps:
    """The one unit work with a greenlet of its own: the hub moving a unit's client:// files
    for a remote pilot (the launcher's client_staging, blocking SFTP in lanes). Stage in runs
    between its bind and its hand-over (then it joins the pilot's queue), stage out between the
    agent's DONE and the unit's. A failure ends the unit FAILED with its words ("client staging
    in: <directive>: <why>"); a kill (cancel, the pilot's end, close) leaves the unit to whoever
    killed it, who ends or moves it."""

    def __init__(self, hub: "Hub", unit: "UnitRecord", staging: Any) -> None:
        self.hub = hub
        self.unit = unit
        self.staging = staging

    def stage_in(self, pilot: "PilotRecord") -> None:
        self.unit.greenlet = gevent.spawn(self._run, self.staging.stage_in, pilot, None)

    def stage_out(self, state: str, ts: float, fields: dict[str, Any]) -> None:
        self.unit.greenlet = gevent.spawn(self._run, self.staging.stage_out, None,
                                          (state, ts, fields))

    def _run(self, step, pilot: "PilotRecord | None", end: tuple | None) -> None:
        hub, unit = self.hub, self.unit
        try:
            step(unit)
        except GreenletExit:
            return
        except Exception as exc:
            hub.ledger.end_unit(unit, states.FAILED, "hub", Why.CLIENT_STAGING, str(exc))
            return
        finally:
            if unit.greenlet is gevent.getcurrent():
                unit.greenlet = None
        if states.is_final(unit.state):
            return
        if end is not None:
            hub.moves.end_as_agent_said(unit, *end)
        elif pilot is not None and pilot.active():
            hub.enqueue(unit, pilot)
        else:  # its pilot ended while the files moved; it never reached the agent
            hub.moves.left_pilot(unit, f"pilot {unit.pilot} ended before the unit reached it")


class PilotLifecycle:
    BOOTSTRAP_TIMEOUT = 60.0

    def __init__(self, hub: "Hub", pilot: "PilotRecord") -> None:
        self.hub = hub
        self.pilot = pilot

    def run(self) -> None:
        """Launch the agent, wait for it to call in, watch it, and end."""
        self._run(self._launch)

    def adopt(self) -> None:
        """A pilot a restarted hub found in its journal (rpg/hub/restore.py): its agent,
        launched by the hub that died, calls in again or is found gone."""
        self._run(self._adopted)

    def _launch(self) -> tuple[str | None, Why | None, str | None]:
        hub, p = self.hub, self.pilot
        if p.final_state_hint is not None:  # canceled before it ever ran
            raise GreenletExit()
        hub.ledger.move("pilot", p, states.LAUNCHING, "hub", sandbox=p.sandbox)
        p.launcher = launcher_for(hub, p)
        p.launcher.launch()
        if p.state == states.LAUNCHING:  # may be remote
            hub.ledger.move("pilot", p, states.PENDING, "hub", sandbox=p.sandbox)
        return self._wait_active(p.launcher)

    def _adopted(self) -> tuple[str | None, Why | None, str | None]:
        from rpg.hub.launchers.adopted import AdoptedLauncher

        p = self.pilot
        p.launcher = AdoptedLauncher(self.hub, p)
        if p.state == states.LAUNCHING:  # its launch may or may not have begun
            return (states.FAILED, Why.LAUNCH_FAILED,
                    "the hub restarted while it was being launched")
        return self._wait_active(p.launcher)

    def _run(self, begin) -> None:
        hub, p = self.hub, self.pilot
        final, why, reason = states.FAILED, Why.INTERNAL, None
        try:
            final, why, reason = begin()
            if final is None:
                final, why, reason = self._watch(p.launcher)
        except GreenletExit:
            final = p.final_state_hint or states.CANCELED
            why = p.final_why or Why.CANCELED
            reason = p.reason or ("canceled by the application" if final == states.CANCELED
                                  else None)
        except LaunchError as exc:
            final, why, reason = states.FAILED, Why.LAUNCH_FAILED, str(exc)
        except Exception as exc:
            hub.log.exception("pilot_lifecycle_error", pilot=p.uid)
            final, why, reason = states.FAILED, Why.INTERNAL, f"internal error: {exc!r}"
        finally:
            self._finish(p.launcher, final, why, reason)

    def _wait_active(self, launcher) -> tuple[str | None, Why | None, str | None]:
        p = self.pilot
        deadline = time.monotonic() + self.BOOTSTRAP_TIMEOUT
        while not p.registered.is_set():
            ended = launcher.poll(timeout=0.2)
            if ended is not None:
                if p.registered.is_set():  # it called in, then ended, within one poll
                    return self._ended(launcher, ended)
                return states.FAILED, Why.BOOTSTRAP, f"agent ended before calling in: {ended}"
            if launcher.queued():
                deadline = time.monotonic() + self.BOOTSTRAP_TIMEOUT
            if time.monotonic() > deadline:
                return (states.FAILED, Why.BOOTSTRAP,
                        "agent did not call in within the bootstrap timeout")
        return None, None, None

    def _watch(self, launcher) -> tuple[str, Why, str]:
        p = self.pilot
        interval = float(p.desc["heartbeat_interval"])
        hb_timeout = float(p.desc["heartbeat_timeout"])
        while True:
            ended = launcher.poll(timeout=interval)
            if ended is not None:
                return self._ended(launcher, ended)
            silent = time.time() - p.last_seen
            if silent > hb_timeout:
                return (states.FAILED, Why.HEARTBEAT_LOST,
                        f"no heartbeat from the agent for {silent:.1f} s")

    def _ended(self, launcher, how: str) -> tuple[str, Why, str]:
        if launcher.ended_cleanly():
            return (states.DONE, Why.RUNTIME_ENDED,
                    self.pilot.reason or "agent finished (runtime ended)")
        return states.FAILED, Why.AGENT_DIED, f"agent died: {how}"

    def _finish(self, launcher, final: str, why: Why, reason: str | None) -> None:
        hub, p = self.hub, self.pilot
        p.stopping = True
        p.stop_reason = (reason if final != states.CANCELED
                         else f"pilot {p.uid} canceled") or f"pilot {p.uid} stopped"
        p.wake.set()  # a long-polling agent hears "shutdown" now
        if launcher is not None:
            try:
                launcher.stop(grace=hub.stop_grace(5.0))
            except GreenletExit:
                raise
            except Exception as exc:
                hub.log.error("launcher_stop_failed", pilot=p.uid, error=str(exc))
        # Whatever the agent did not report as final ends here, with the pilot's reason: a pilot
        # that failed or ran out of time fails its units; one canceled or closed cancels them.
        words = f"pilot {p.uid} ended ({final}): {reason or 'no reason given'}"
        unit_state = (states.FAILED if final == states.FAILED or why == Why.RUNTIME_ENDED
                      else states.CANCELED)
        closing = why in (Why.SESSION_CLOSED, Why.HUB_STOPPED)
        walltime = why == Why.RUNTIME_ENDED
        unit_why = Why.PILOT_WALLTIME if walltime else Why.PILOT_ENDED
        for uid in list(p.in_flight) + list(p.queue):
            unit = hub.units.get(uid)
            if unit is None or states.is_final(unit.state):
                continue
            if unit.greenlet is not None:  # its client:// files were moving
                unit.greenlet.kill(block=False)
                unit.greenlet = None
            if closing or unit.cancel_reason is not None:
                hub.ledger.end_unit(unit, unit_state, "hub", unit_why, words)
            elif walltime and hub.moves.walltime_moves(unit):
                hub.moves.restart(unit, f"pilot walltime: {words}")
            elif not unit.at_agent and hub.binding.could_run_elsewhere(unit):
                hub.moves.restart(unit, words)  # it never reached the agent: it goes elsewhere
            elif unit.desc.get("restartable") and (
                    final == states.FAILED or hub.binding.could_run_elsewhere(unit)):
                hub.moves.restart(unit, words)  # it may run again: on another pilot
            else:
                hub.ledger.end_unit(unit, unit_state, "hub", unit_why, words)
        p.queue.clear()
        hub.ledger.end_pilot(p, final, why, reason)
        hub.binding.review()
        gevent.sleep(0)
