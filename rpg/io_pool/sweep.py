"""Find and kill unit processes of a pilot: by the marker every unit carries in its environment,
and by working directory inside the pilot sandbox.

Units lead their own process groups (so cancel can kill a whole tree); if their agent dies hard they
are reparented away from it. Each unit's environment has ``RPG_PILOT_KEY`` (session uid and
pilot uid: pilot uids repeat across sessions); scanning /proc for it finds the orphans wherever
they went. A daemon that cleared its environment (``env -i setsid ...``) loses the marker, so a
second one counts too: a process of this user, without a controlling terminal (an interactive
shell that ``cd``-ed there is spared), whose cwd is inside a unit sandbox of the pilot
(``<pilot sandbox>/unit.*``: units start there; the pilot sandbox itself may be a directory
others use too, such as ``~``). A process that both cleared its environment and left its unit
sandbox escapes. Blocking (reads /proc): run it in a lane or a process.
"""

from __future__ import annotations

import os
import signal
import time

from rpg.io_pool import blocking


def _stat(pid: int | str) -> list[bytes]:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold spaces and
    parentheses): [state, ppid, pgrp, session, tty, ...]. Raises OSError if it is gone."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[-1].split()


def pilot_key(session_uid: str, pilot_uid: str) -> str:
    """The marker that names one pilot of one session on a machine."""
    return f"{session_uid}/{pilot_uid}"


def pilot_processes(key: str, sandbox: str | None = None) -> list[int]:
    """Live processes whose environment carries ``RPG_PILOT_KEY=key``, and, given the pilot's
    ``sandbox``, this user's processes without a terminal whose cwd is in one of its unit
    sandboxes."""
    if "/" not in key:
        raise ValueError(f"pilot_processes needs a session/pilot key (pilot_key()), got {key!r}: "
                         "a bare pilot uid would match other sessions' pilots too")
    marker = b"RPG_PILOT_KEY=" + key.encode() + b"\x00"
    root = os.path.realpath(sandbox) if sandbox else None
    spare = _self_and_ancestors()
    uid = os.getuid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in spare:
            continue
        try:
            fields = _stat(name)
            if fields[0] == b"Z":
                continue  # a zombie: dead already, its parent (or init) reaps it
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = fh.read() + b"\x00"
            if marker in env or (root is not None and fields[4] == b"0"
                                 and _works_in(name, root, uid)):
                found.append(int(name))
        except (OSError, IndexError):
            continue
    return found


def kill_unit_groups(leaders: list[tuple[int, str]]) -> int:
    """SIGKILL the process group of each ``(pid, unit uid)`` leader whose environment still
    says it is that unit (a pid that was reused is spared); returns how many were killed."""
    killed = 0
    for pid, uid in leaders:
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if b"\x00RPG_UNIT_UID=" + uid.encode() + b"\x00" not in b"\x00" + fh.read():
                    continue
            os.killpg(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            continue
    return killed


def kill_child_groups(parent: int) -> list[int]:
    """SIGKILL the process group of each child of ``parent``, which the caller has stopped
    (SIGSTOP): none of its children is reaped meanwhile, so no pid here can have been reused,
    a zombie leader's group included. Each unit leads its own group; a child that does not is
    killed alone. Returns the pids signaled."""
    killed: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = _stat(name)
            if int(fields[1]) != parent:
                continue
            pid, pgrp = int(name), int(fields[2])
            if pgrp == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (OSError, IndexError, ValueError):
            continue
    return killed


def kill_stalled_spawners_units(spawner: int, leaders: list[tuple[int, str]],
                                wait_s: float = 1.0) -> int:
    """The units of a spawner the caller has just sent SIGSTOP: once it is seen stopped (or a
    zombie), up to ``wait_s``, its children's groups (``kill_child_groups``); and the
    ``(pid, uid)`` leaders the caller knew of, checked by environment (``kill_unit_groups``),
    for those that stopped being its children first (it reaped them, or it exited). Returns
    how many were signaled."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = _stat(spawner)[0]
        except (OSError, IndexError):
            break
        if state in (b"T", b"t", b"Z"):
            break
        time.sleep(0.01)
    children = kill_child_groups(spawner)
    return len(children) + kill_unit_groups([lu for lu in leaders if lu[0] not in children])


UNIT_SANDBOX_PREFIX = "unit."  # a unit's sandbox is <pilot sandbox>/<unit uid>


def _works_in(pid: str, root: str, uid: int) -> bool:
    """The process belongs to ``uid`` and its cwd is in a unit sandbox under ``root``."""
    if os.stat(f"/proc/{pid}").st_uid != uid:
        return False
    cwd = os.readlink(f"/proc/{pid}/cwd")
    if cwd.endswith(" (deleted)"):
        cwd = cwd[: -len(" (deleted)")]
    return cwd.startswith(root.rstrip("/") + "/" + UNIT_SANDBOX_PREFIX)


def _self_and_ancestors() -> set[int]:
    """This process and its ancestors: never swept, wherever their cwd is."""
    pids, pid = set(), os.getpid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(_stat(pid)[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def kill_pilot_processes(key: str, sandbox: str | None = None, rounds: int = 3) -> int:
    """SIGKILL every process of the pilot (``pilot_processes``); returns how many were found."""
    total = 0
    for _ in range(rounds):
        pids = pilot_processes(key, sandbox)
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
