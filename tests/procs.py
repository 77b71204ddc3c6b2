"""Process checks shared by the tests."""

from __future__ import annotations

import time

from rpg.io_pool.sweep import pilot_processes


def wait_pilot_processes(key: str, count: int, timeout: float = 10.0) -> list[int]:
    """Processes carrying a pilot's key once ``count`` of them are there, or ``timeout`` s
    went by (EXECUTING means a unit's process exists, not that its children do yet)."""
    deadline = time.monotonic() + timeout
    while True:
        found = pilot_processes(key)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def wait_no_pilot_processes(key: str, timeout: float = 10.0) -> list[int]:
    """Processes still carrying a pilot's key once kills have had ``timeout`` s to land."""
    deadline = time.monotonic() + timeout
    while True:
        left = pilot_processes(key)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
