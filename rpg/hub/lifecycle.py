"""UnitLifecycle and PilotLifecycle: one greenlet each, on the hub loop.

Each waits where it must (for a pilot, for the agent to call in, for a final state), re-checks
its prerequisites after every wait, and keeps its cleanup in one try/finally: cancel is killing
the greenlet, at any point.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import gevent
from gevent import GreenletExit

from rpg import states
from rpg.hub.launchers import LaunchError, launcher_for
from rpg.states import Why

if TYPE_CHECKING:
    from rpg.hub.hub import Hub
    from rpg.hub.records import PilotRecord, UnitRecord


class UnitLifecycle:
    def __init__(self, hub: "Hub", unit: "UnitRecord") -> None:
        self.hub = hub
        self.unit = unit

    def run(self) -> None:
        hub, unit = self.hub, self.unit
        try:
            while self._attempt():
                pass  # the pilot died and the unit may restart: bind it again
        except GreenletExit:
            pass
        finally:
            if not states.is_final(unit.state):
                # Canceled before the agent had it (a queued entry is skipped by the next pull),
                # or the session is closing.
                hub.ledger.end_unit(unit, states.CANCELED, "hub", unit.cancel_why or Why.CANCELED,
                                    unit.cancel_reason or "canceled")
            unit.greenlet = None

    def _attempt(self) -> bool:
        """Bind, hand over, wait for the end. True if the unit must start again."""
        hub, unit = self.hub, self.unit
        while True:
            if unit.cancel_reason is not None:
                raise GreenletExit()
            pilot, why = hub.binding.choose(unit)
            if pilot is not None:
                break
            if why is not None:
                hub.ledger.end_unit(unit, states.FAILED, "hub", Why.NO_PILOT, why)
                return False
            hub.binding.wait_changed(timeout=5.0)
        hub.ledger.bind(unit, pilot)
        staging = pilot.launcher.client_staging if pilot.launcher is not None else None
        if (staging is not None and staging.has_stage_in(unit.desc)
                and not self._client_staging(staging.stage_in)):
            return False
        hub.enqueue(unit, pilot)
        while not states.is_final(unit.state):
            unit.wake.wait()
            unit.wake.clear()
            if unit.restart:
                unit.restart = False
                return True
            if unit.done_at_agent is not None and not states.is_final(unit.state):
                state, ts, fields = unit.done_at_agent
                if staging is None or self._client_staging(staging.stage_out):
                    hub.end_unit_as_agent_said(unit, state, ts, fields)
        return False

    def _client_staging(self, step) -> bool:
        """Run a client:// staging step (rpg.staging.ClientStaging, on this greenlet); a failure
        ends the unit FAILED with its words ("client staging in: <directive>: <why>")."""
        try:
            step(self.unit)
            return True
        except GreenletExit:
            raise
        except Exception as exc:
            self.hub.ledger.end_unit(self.unit, states.FAILED, "hub", Why.CLIENT_STAGING,
                                     str(exc))
            return False


class PilotLifecycle:
    BOOTSTRAP_TIMEOUT = 60.0

    def __init__(self, hub: "Hub", pilot: "PilotRecord") -> None:
        self.hub = hub
        self.pilot = pilot

    def run(self) -> None:
        hub, p = self.hub, self.pilot
        final, why, reason = states.FAILED, Why.INTERNAL, None
        launcher = None
        try:
            if p.final_state_hint is not None:  # canceled before it ever ran
                raise GreenletExit()
            hub.ledger.move("pilot", p, states.LAUNCHING, "hub", sandbox=p.sandbox)
            launcher = launcher_for(hub, p)
            p.launcher = launcher
            launcher.launch()
            if p.state == states.LAUNCHING:  # may be remote
                hub.ledger.move("pilot", p, states.PENDING, "hub", sandbox=p.sandbox)
            final, why, reason = self._wait_active(launcher)
            if final is None:
                final, why, reason = self._watch(launcher)
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
            self._finish(launcher, final, why, reason)

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
        for uid in list(p.in_flight) + list(p.queue):
            unit = hub.units.get(uid)
            if unit is None or states.is_final(unit.state):
                continue
            if final == states.FAILED and unit.desc.get("restartable") \
                    and unit.cancel_reason is None:
                hub.ledger.restart_unit(unit, words)
            else:
                hub.ledger.end_unit(unit, unit_state, "hub", Why.PILOT_ENDED, words)
        p.queue.clear()
        hub.ledger.end_pilot(p, final, why, reason)
        hub.binding.changed()
        gevent.sleep(0)
