"""rpg: a pilot-job framework for Python on gevent.

Many small units run on a few big pilots. The public API, and only that::

    import rpg
    with rpg.Session() as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(resource="local", cores=4))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/echo", arguments=["hi"])])
        umgr.wait_units()
"""

from rpg import states
from rpg.description import DescriptionError, PilotDescription, UnitDescription
from rpg.session import (
    Pilot,
    PilotManager,
    Session,
    SessionClosed,
    SessionError,
    Unit,
    UnitManager,
)
from rpg.states import CANCELED, DONE, FAILED, FINAL, Why

__version__ = "0.1.0"

__all__ = [
    "Session",
    "SessionClosed",
    "SessionError",
    "PilotManager",
    "UnitManager",
    "PilotDescription",
    "UnitDescription",
    "DescriptionError",
    "Pilot",
    "Unit",
    "states",
    "DONE",
    "FAILED",
    "CANCELED",
    "FINAL",
    "Why",
]
