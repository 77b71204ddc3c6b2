"""Test helpers: a local pilot and a unit manager that uses it, in a session."""

from __future__ import annotations

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
