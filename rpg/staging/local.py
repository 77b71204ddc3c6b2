"""Staging on one machine: the copy, link or move of files between a unit's sandbox and
elsewhere on the agent's machine (what an agent does for every directive it is given).

Every function here blocks: the agent runs them in the io_pool lane of the disk they touch.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from typing import Any

from rpg.staging.directives import flags, inner_outer
from rpg.staging.paths import StagingError, confine_sandbox_side, other_side, sandbox_side

CHUNK = 1 << 20


def make_sandbox(path: str, files: tuple[str, ...] = ()) -> None:
    """The unit sandbox (parents as needed); an existing one is fine. ``files`` (names in it,
    its stdout and stderr) are made empty if missing, so that the unit's spawn only opens them:
    creating them was a quarter of what the agent's one spawner waited for per unit. A file
    that cannot be made here is left to the spawn, which says why."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
    for name in files:
        try:
            os.close(os.open(os.path.join(path, name),
                             os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666))
        except OSError:
            pass


def stage(directive: dict[str, Any], direction: str, unit_sandbox: str,
          pilot_sandbox: str) -> dict[str, Any]:
    """Carry out one directive staged ``direction`` ("in": into the sandbox, "out": out of it).
    Returns {"bytes", "seconds"}. Raises StagingError (an OS error's words, or which rule the
    directive broke); the caller names the directive."""
    t0 = time.perf_counter()
    inner, outer = inner_outer(directive, direction)
    inner_path, root = sandbox_side(inner, unit_sandbox, pilot_sandbox)
    outer_path = other_side(outer, unit_sandbox, pilot_sandbox)
    src, dst = (outer_path, inner_path) if direction == "in" else (inner_path, outer_path)
    action = directive["action"]
    fl = flags(directive)
    try:
        confine_sandbox_side(inner_path, root, direction)
        if "create_parents" in fl:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
        if action == "link":
            nbytes = link(src, dst)
        elif action == "move":
            nbytes = move(src, dst)
        else:  # copy, transfer (client:// is this machine for a local pilot)
            nbytes = copy(src, dst, recursive="recursive" in fl)
    except StagingError:
        raise
    except OSError as exc:
        raise StagingError(exc.strerror or str(exc)) from exc
    return {"bytes": nbytes, "seconds": time.perf_counter() - t0}


def link(src: str, dst: str) -> int:
    """``dst`` becomes a symlink to ``src`` (replacing what was there). 0 bytes moved."""
    if os.path.lexists(dst):
        os.unlink(dst)
    os.symlink(src, dst)
    return 0


def move(src: str, dst: str) -> int:
    """Move a file or a tree; returns its size in bytes."""
    nbytes = size(src)
    shutil.move(src, dst)
    return nbytes


def copy(src: str, dst: str, recursive: bool = False) -> int:
    """Copy a file, a named pipe (streamed until its writer closes it), or with ``recursive``
    a tree (merged into ``dst``); returns the bytes copied. A device or a socket is refused:
    a copy from /dev/zero or /dev/urandom never ends and fills the disk."""
    if os.path.isdir(src):
        if not recursive:
            raise StagingError("source is a directory; add the 'recursive' flag")
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return size(dst)
    mode = os.stat(src).st_mode
    if stat.S_ISREG(mode):
        shutil.copyfile(src, dst)  # sendfile fast path
        return os.path.getsize(dst)
    if not stat.S_ISFIFO(mode):
        kind = ("a character device" if stat.S_ISCHR(mode) else
                "a block device" if stat.S_ISBLK(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise StagingError(f"source {src} is {kind}: only files, directories and named pipes "
                           f"are staged (a device never ends and would fill the disk)")
    with open(src, "rb") as fin, open(dst, "wb") as fout:  # shutil refuses pipes
        shutil.copyfileobj(fin, fout, CHUNK)
        return fout.tell()


def size(path: str) -> int:
    """Bytes in a file, or in every file of a tree."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)
