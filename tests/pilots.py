"""Test helpers: a local pilot and a unit manager that uses it, in a session."""

from __future__ import annotations

import threading
from typing import Any

import rpg


def local_pilot(session: rpg.Session, cores: int = 4, **kw: Any) -> tuple[Any, Any, Any]:
    """(PilotManager, Pilot, UnitManager) of a local pilot with ``cores`` in ``session``."""
    pmgr = rpg.PilotManager(session)
    pilot = pmgr.submit_pilots(rpg.PilotDescription(resource="local", cores=cores, runtime=5,
                                                    **kw))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    return pmgr, pilot, umgr


def unrun_agent(sandbox: str, kill_grace: float = 1.0) -> Any:
    """An Agent made in this process and never run: its unit bookkeeping and its updates
    (``agent.updates``) without a hub, lanes or a spawner."""
    from rpg.agent.agent import Agent
    from rpg.launch_config import AgentConfig

    return Agent(AgentConfig(pilot_uid="pilot.000000", session_uid="s", token="t",
                             hub_address="tcp://127.0.0.1:9", sandbox=sandbox, cores=1, gpus=0,
                             runtime_s=0, heartbeat_interval=1, heartbeat_timeout=1,
                             staging_timeout=10, kill_grace=kill_grace))


def record_states(umgr: Any) -> dict[str, list[str]]:
    """Register a callback on ``umgr`` that records each unit's states as they arrive (on the
    callback thread); returns the dict it fills, uid -> states in order."""
    seen: dict[str, list[str]] = {}
    lock = threading.Lock()

    def on_state(unit: Any, state: str) -> None:
        with lock:
            seen.setdefault(unit.uid, []).append(state)

    umgr.register_callback(on_state)
    return seen
