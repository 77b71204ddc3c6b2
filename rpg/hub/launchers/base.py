"""The launcher interface, and the agent configuration every launcher hands to its agent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rpg.agent.cleanup import pilot_key

if TYPE_CHECKING:
    from rpg.hub.hub import Hub
    from rpg.hub.records import PilotRecord


class LaunchError(RuntimeError):
    """The agent could not be started; the message is the pilot's FAILED reason."""


class Launcher:
    """Starts, watches and stops one pilot's agent. All methods run on the hub loop and
    put their blocking work in io_pool lanes."""

    def __init__(self, hub: "Hub", pilot: "PilotRecord") -> None:
        self.hub = hub
        self.pilot = pilot

    def agent_config(self, hub_address: str, sandbox: str) -> dict[str, Any]:
        d = self.pilot.desc
        return {
            "pilot_uid": self.pilot.uid,
            "session_uid": self.hub.session_uid,
            "token": self.pilot.token,
            "hub_address": hub_address,
            "sandbox": sandbox,
            "cores": d["cores"],
            "gpus": d["gpus"],
            "runtime_s": float(d["runtime"]) * 60.0,
            "heartbeat_interval": d["heartbeat_interval"],
            "heartbeat_timeout": d["heartbeat_timeout"],
            "staging_timeout": d["staging_timeout"],
            "kill_grace": d["kill_grace"],
            "environment": d["environment"],
        }

    @property
    def key(self) -> str:
        """RPG_PILOT_KEY of this pilot's unit processes (for rpg.agent.cleanup)."""
        return pilot_key(self.hub.session_uid, self.pilot.uid)

    def launch(self) -> None:
        raise NotImplementedError

    def queued(self) -> bool:
        """True while the resource has not started the agent yet (a batch job in the queue)."""
        return False

    def bootstrap_timeout(self, default: float) -> float:
        return default

    def poll(self, timeout: float) -> str | None:
        """Wait up to ``timeout`` s; None while the agent runs, else how it ended."""
        raise NotImplementedError

    def ended_cleanly(self) -> bool:
        return False

    def stop(self, grace: float) -> None:
        raise NotImplementedError

    # client:// staging that the agent cannot do itself (it runs on another machine). The unit
    # stays BOUND during stage_in and STAGING_OUT during stage_out; both run on the unit's
    # lifecycle greenlet (blocking work in lanes) and raise on failure (the unit FAILS).
    def has_stage_in(self, desc: dict[str, Any]) -> bool:
        return False

    def has_stage_out(self, desc: dict[str, Any]) -> bool:
        return False

    def stage_in(self, unit: Any) -> None:
        pass

    def stage_out(self, unit: Any) -> None:
        pass
