"""Reading a unit's output while it runs (``Unit.follow``): one bounded chunk of a file in the
unit's sandbox, from an offset, where the hub reaches that sandbox. A local or SLURM pilot's
sandbox is on this machine (or a filesystem it shares): ``os.pread`` in the file's disk lane.
A pilot on another machine: SFTP, in the launcher's transfer lane, over its connection. The
last component is never followed if it is a link (a unit that replaced its stdout by a link
to another file gets an error, not that file), and only regular files are read.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Any

from rpg.hub.service import ProtocolError, require

MAX_CHUNK = 1 << 20  # bytes one read returns at most
READ_TIMEOUT = 30.0


def unit_file_path(sandbox: str, name: str) -> str:
    """``name`` (relative, inside the unit sandbox) as a path there; ProtocolError if not."""
    require(isinstance(name, str) and 0 < len(name) <= 4096 and "\x00" not in name,
            "name must be a file name in the unit sandbox (1-4096 characters)")
    require(not name.startswith("/"), f"name {name!r} must be relative to the unit sandbox")
    path = posixpath.normpath(posixpath.join(sandbox, name))
    require(path.startswith(sandbox.rstrip("/") + "/"),
            f"name {name!r} leaves the unit sandbox")
    return path


def _local_read(path: str, offset: int, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""  # not written yet
    except OSError as exc:
        raise ProtocolError(f"{path}: {exc.strerror}"  # noqa: B904 (its words suffice)
                            + (" (a symbolic link: not followed)" if exc.errno == 40 else ""))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ProtocolError(f"{path} is not a regular file")
        return os.pread(fd, limit, offset)
    finally:
        os.close(fd)


def _sftp_read(sftp: Any, _known_dirs: Any, path: str, offset: int, limit: int) -> bytes:
    try:
        st = sftp.lstat(path)
    except FileNotFoundError:
        return b""
    if stat.S_ISLNK(st.st_mode or 0):
        raise ProtocolError(f"{path} is a symbolic link: not followed")
    if not stat.S_ISREG(st.st_mode or 0):
        raise ProtocolError(f"{path} is not a regular file")
    with sftp.open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(limit)


def read_unit_file(hub: Any, launcher: Any, path: str, offset: int, limit: int) -> bytes:
    """One chunk (hub loop; the read itself in a lane)."""
    require(not isinstance(offset, bool) and isinstance(offset, int) and offset >= 0,
            "offset must be an integer >= 0")
    require(not isinstance(limit, bool) and isinstance(limit, int) and 0 < limit <= MAX_CHUNK,
            f"limit must be an integer in [1, {MAX_CHUNK}]")
    if launcher.client_staging is not None:  # the sandbox is on another machine
        return launcher.sftp_call(_sftp_read, path, offset, limit)
    return hub.pool.for_path(path).run(_local_read, path, offset, limit, timeout=READ_TIMEOUT)
