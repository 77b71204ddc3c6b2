"""rpg.io_pool: every blocking call rpg makes runs here, on real OS threads, never on a loop."""

from rpg.io_pool.batch import Batcher
from rpg.io_pool.lane import (
    IOPoolError,
    IOTimeout,
    Lane,
    LaneClosed,
    LaneDegraded,
    LaneFull,
)
from rpg.io_pool.loop_watch import LoopWatch, loop_blocked_total, yield_to_loop
from rpg.io_pool.pool import NET, SPAWN, IOPool, read_mounts
from rpg.io_pool.process import Child, SpawnError, spawn

__all__ = [
    "IOPool",
    "Batcher",
    "Lane",
    "IOPoolError",
    "IOTimeout",
    "LaneFull",
    "LaneDegraded",
    "LaneClosed",
    "SPAWN",
    "NET",
    "read_mounts",
    "Child",
    "SpawnError",
    "spawn",
    "LoopWatch",
    "loop_blocked_total",
    "yield_to_loop",
]
