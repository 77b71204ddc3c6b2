"""Find and kill unit processes of a pilot by the marker every unit carries in its environment.

Units run in their own sessions (so cancel can kill a whole tree); if their agent dies hard they
are reparented away from it. Each unit's environment has ``RPG_PILOT_UID``; scanning /proc for it
finds the orphans wherever they went. Blocking (reads /proc): run it in a lane or a process.
"""

from __future__ import annotations

import os
import signal

from rpg.io_pool import blocking


def pilot_processes(pilot_uid: str) -> list[int]:
    marker = b"RPG_PILOT_UID=" + pilot_uid.encode() + b"\x00"
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = fh.read() + b"\x00"
        except OSError:
            continue
        if marker in env:
            found.append(int(name))
    return found


def kill_pilot_processes(pilot_uid: str, rounds: int = 3) -> int:
    """SIGKILL every process carrying the pilot's marker; returns how many were found."""
    total = 0
    for _ in range(rounds):
        pids = pilot_processes(pilot_uid)
        if not pids:
            break
        total += len(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        blocking.sleep(0.05)
    return total
