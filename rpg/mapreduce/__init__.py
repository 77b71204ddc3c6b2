"""rpg.MapReduce: progressive, cached, cancelable statistics over large files (hist, entropy,
diff, and kinds you register), computed in the function workers of rpg pilots.

Names load on first use (PEP 562): a function worker that unpickles ``chunks.map_chunk``
imports this package, and must not pay for the client (``jobs`` imports the session)."""

from typing import Any

_WHERE = {
    "MapReduce": "jobs", "Job": "jobs", "Answer": "jobs", "MapReduceError": "jobs",
    "RUNNING": "jobs", "DONE": "jobs", "CANCELED": "jobs", "FAILED": "jobs",
    "FileChanged": "chunks", "NotRegularFile": "chunks",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'rpg.mapreduce' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"rpg.mapreduce.{where}"), name)
    globals()[name] = value
    return value
