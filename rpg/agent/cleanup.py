"""Find and kill unit processes of a pilot by the marker every unit carries in its environment.

Units run in their own sessions (so cancel can kill a whole tree); if their agent dies hard they
are reparented away from it. Each unit's environment has ``RPG_PILOT_KEY`` (session uid and
pilot uid: pilot uids repeat across sessions); scanning /proc for it finds the orphans wherever
they went. Blocking (reads /proc): run it in a lane or a process.
"""

from __future__ import annotations

import os
import signal

from rpg.io_pool import blocking


def pilot_key(session_uid: str, pilot_uid: str) -> str:
    """The marker that names one pilot of one session on a machine."""
    return f"{session_uid}/{pilot_uid}"


def pilot_processes(key: str) -> list[int]:
    """Live processes whose environment carries ``RPG_PILOT_KEY=key``."""
    if "/" not in key:
        raise ValueError(f"pilot_processes needs a session/pilot key (pilot_key()), got {key!r}: "
                         "a bare pilot uid would match other sessions' pilots too")
    marker = b"RPG_PILOT_KEY=" + key.encode() + b"\x00"
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                    continue  # a zombie: dead already, its parent (or init) reaps it
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = fh.read() + b"\x00"
        except (OSError, IndexError):
            continue
        if marker in env:
            found.append(int(name))
    return found


def kill_pilot_processes(key: str, rounds: int = 3) -> int:
    """SIGKILL every process carrying the pilot's key; returns how many were found."""
    total = 0
    for _ in range(rounds):
        pids = pilot_processes(key)
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
