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

from typing import Any

# Names are imported on first use (PEP 562): ``import rpg`` stays cheap, so a function worker
# (``python -m rpg.agent.worker``) or the agent does not pay for the whole client.
_WHERE = {
    "Session": "rpg.session", "SessionClosed": "rpg.session", "SessionError": "rpg.session",
    "PilotManager": "rpg.managers", "UnitManager": "rpg.managers", "Pilot": "rpg.session",
    "Unit": "rpg.session",
    "PilotDescription": "rpg.description", "UnitDescription": "rpg.description",
    "DescriptionError": "rpg.description",
    "CANCELED": "rpg.states", "DONE": "rpg.states", "FAILED": "rpg.states",
    "FINAL": "rpg.states", "Why": "rpg.states",
    "Executor": "rpg.executor",
    "MapReduce": "rpg.mapreduce.jobs", "MapReduceError": "rpg.mapreduce.jobs",
    "RemoteTraceback": "rpg.calls", "FunctionError": "rpg.calls",
}


def __getattr__(name: str) -> Any:
    if name == "states":
        import rpg.states
        return rpg.states
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'rpg' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "MapReduce",
    "MapReduceError",
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
    "Executor",
    "RemoteTraceback",
    "FunctionError",
]
