"""Staging over SFTP: files between the application's machine (here) and a pilot sandbox on
another machine, for the hub's ``client://`` staging of a remote pilot.

Every function here blocks on the network: callers run them in an SFTP lane, with an SFTP
session of their own (paramiko's are not safe to share between threads). ``known_dirs`` is the
caller's record of remote directories known to exist (per connection), which spares a round
trip per directive.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import time
from typing import TYPE_CHECKING, Any

from rpg.description import split_url
from rpg.staging.directives import flags, inner_outer
from rpg.staging.paths import StagingError, confine_sandbox_side, sandbox_side

if TYPE_CHECKING:
    import paramiko

READ_WINDOW = 4 * 1024 * 1024  # a get keeps at most this much in flight (128 reads of 32 KiB)
SFTP_CHUNK = 32 * 1024  # paramiko's SFTP request size


class SFTPFileSystem:
    """The remote file system as the confinement check sees it (``rpg.staging.paths``)."""

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self.sftp = sftp

    def realpath(self, path: str) -> str:
        return self.sftp.normalize(path)

    def lexists(self, path: str) -> bool:
        try:
            self.sftp.lstat(path)
        except FileNotFoundError:
            return False
        return True


def transfer(sftp: paramiko.SFTPClient, known_dirs: set[str], directive: dict[str, Any],
             direction: str, unit_sandbox: str, pilot_sandbox: str) -> tuple[int, float]:
    """Carry out one ``client://`` directive between here and a remote sandbox: "in" puts the
    local file (or tree) into it, "out" gets one from it. Returns (bytes, seconds). Raises
    StagingError for a broken rule, OSError (or paramiko's errors) for the rest."""
    t0 = time.perf_counter()
    fl = flags(directive)
    inner, outer = inner_outer(directive, direction)
    remote, root = sandbox_side(inner, unit_sandbox, pilot_sandbox)
    local = split_url(outer)[1]  # client://: absolute already (the session resolved it)
    fs = SFTPFileSystem(sftp)
    makedirs(sftp, unit_sandbox, known_dirs)
    if direction == "in":
        if "create_parents" in fl:
            makedirs(sftp, posixpath.dirname(remote), known_dirs)
        confine_sandbox_side(remote, root, direction, fs)
        if os.path.isdir(local):
            if "recursive" not in fl:
                raise StagingError("source is a directory; add the 'recursive' flag")
            nbytes = put_tree(sftp, local, remote)
        else:
            nbytes = put_file(sftp, local, remote)
        if directive["action"] == "move":
            remove_local(local)
    else:
        confine_sandbox_side(remote, root, direction, fs)
        if "create_parents" in fl:
            os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        if stat.S_ISDIR(sftp.stat(remote).st_mode or 0):
            if "recursive" not in fl:
                raise StagingError("source is a directory; add the 'recursive' flag")
            nbytes = get_tree(sftp, remote, local)
        else:
            nbytes = get_file(sftp, remote, local)
        if directive["action"] == "move":
            remove_remote(sftp, remote)
    return nbytes, time.perf_counter() - t0


def makedirs(sftp: paramiko.SFTPClient, path: str, known_dirs: set[str]) -> None:
    """``mkdir -p`` on the remote (new directories owner-only)."""
    if path in known_dirs:
        return
    try:
        if stat.S_ISDIR(sftp.stat(path).st_mode or 0):
            known_dirs.add(path)
            return
        raise StagingError(f"{path} exists and is not a directory")
    except FileNotFoundError:
        pass
    parent = posixpath.dirname(path)
    if parent != path:
        makedirs(sftp, parent, known_dirs)
    try:
        sftp.mkdir(path, 0o700)
    except OSError:
        if not stat.S_ISDIR(sftp.stat(path).st_mode or 0):
            raise
    known_dirs.add(path)


def put_file(sftp: paramiko.SFTPClient, local: str, remote: str) -> int:
    # putfo streams in 32 KiB pipelined writes; confirm=True checks the remote size after.
    with open(local, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        sftp.putfo(fh, remote, file_size=size, confirm=True)
    return size


def get_file(sftp: paramiko.SFTPClient, remote: str, local: str) -> int:
    # Pipelined reads, one window at a time: memory stays bounded (READ_WINDOW), and it is
    # faster than getfo(max_concurrent_prefetch_requests=...), whose limiter sleeps.
    total = 0
    with sftp.open(remote, "rb") as fr, open(local, "wb") as fh:
        size = fr.stat().st_size or 0
        while total < size:
            end = min(size, total + READ_WINDOW)
            chunks = [(o, min(SFTP_CHUNK, end - o)) for o in range(total, end, SFTP_CHUNK)]
            fh.writelines(fr.readv(chunks))
            total = end
        while True:  # the file grew since the stat: read the rest plainly
            data = fr.read(READ_WINDOW)
            if not data:
                break
            fh.write(data)
            total += len(data)
    return total


def put_tree(sftp: paramiko.SFTPClient, local: str, remote: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(local):
        rel = os.path.relpath(dirpath, local)
        rdir = remote if rel == "." else posixpath.join(remote, *rel.split(os.sep))
        try:
            sftp.mkdir(rdir, 0o700)
        except OSError:
            if not stat.S_ISDIR(sftp.stat(rdir).st_mode or 0):
                raise
        for name in files:
            total += put_file(sftp, os.path.join(dirpath, name), posixpath.join(rdir, name))
    return total


def get_tree(sftp: paramiko.SFTPClient, remote: str, local: str) -> int:
    total = 0
    os.makedirs(local, exist_ok=True)
    for entry in sftp.listdir_attr(remote):
        r = posixpath.join(remote, entry.filename)
        loc = os.path.join(local, entry.filename)
        mode = entry.st_mode or 0
        if stat.S_ISDIR(mode):
            total += get_tree(sftp, r, loc)
        elif stat.S_ISREG(mode):
            total += get_file(sftp, r, loc)
    return total


def remove_local(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def remove_remote(sftp: paramiko.SFTPClient, path: str) -> None:
    if stat.S_ISDIR(sftp.lstat(path).st_mode or 0):
        for entry in sftp.listdir_attr(path):
            remove_remote(sftp, posixpath.join(path, entry.filename))
        sftp.rmdir(path)
    else:
        sftp.remove(path)
