"""What runs on the pilot, in a warm function worker: the probe of a job's files and the map
of one chunk. Both read only through the disk lane of the file's device (``rpg.io_pool``, one
per worker process), with a timeout: a read stuck on a dying disk costs the call its
``read_timeout`` and leaves one lane thread stuck, never the worker, which goes on serving
chunks of other disks.

A file's identity is ``(st_ino, st_size, st_mtime_ns, st_ctime_ns)``, taken at the
probe and checked again before and after each chunk's reads: a write changes the ctime (which no
user can set back), so a file that changes under a job fails it (``FileChanged``) instead of
mixing two versions. The risk: a file system with coarse timestamps (FAT: 2 s, some NFS
servers: 1 s) can hide a same-size rewrite made within one tick of the probe.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Any, Callable, Sequence

import numpy as np

BLOCK = 1 << 20  # bytes per read: as the single-process baseline reads them

_pool: Any = None


class FileChanged(RuntimeError):
    """A file's identity (size, mtime, ctime, inode) is not what the job's probe saw."""


class NotRegularFile(ValueError):
    """MapReduce reads regular files only."""


def _lane(path: str, read_timeout: float) -> Any:
    global _pool
    if _pool is None:
        from rpg.io_pool import IOPool  # imported here: only workers that map load gevent
        _pool = IOPool(disk_threads=2, spawn_threads=1, net_threads=1,
                       stall_after=read_timeout)
    return _pool.for_path(path)


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    # Not st_dev: NFS and Lustre clients number one mount differently on each host.
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_hash(ident: Sequence[int]) -> str:
    """The ``<filehash>`` of cache names: a digest of the identity (see the module's risk)."""
    return hashlib.sha1(":".join(str(int(x)) for x in ident).encode()).hexdigest()[:20]


def _open(path: str) -> tuple[int, tuple[int, ...]]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, identity(st)


def _pread_full(fd: int, view: memoryview, pos: int) -> int:
    """Fill ``view`` from offset ``pos``; fewer bytes only at the end of the file (a short
    read in the middle, as FUSE or NFS may give, is read on)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], pos + got)
        if n == 0:
            break
        got += n
    return got


def _fstat_identity(fd: int) -> tuple[int, ...]:
    return identity(os.fstat(fd))


def probe(paths: Sequence[str], read_timeout: float) -> list[tuple[int, ...]]:
    """The identity of each file (the open and fstat run in the file's disk lane)."""
    out = []
    for path in paths:
        lane = _lane(path, read_timeout)
        fd, ident = lane.run(_open, path, timeout=read_timeout)
        os.close(fd)
        out.append(ident)
    return out


def map_chunk(fn: Callable[..., Any], reduce: Callable[[Any, Any], Any], paths: Sequence[str],
              idents: Sequence[Sequence[int]], start: int, end: int, step: int,
              read_timeout: float) -> list[Any]:
    """Map bytes [start, end) of the files: one reduced partial per ``step`` bytes (the last
    may be shorter), so one chunk also fills the cache's finer level. Raises FileChanged if a
    file is not the one the probe saw, before or after the reads."""
    lanes = [_lane(p, read_timeout) for p in paths]
    fds: list[int] = []
    try:
        for path, ident, lane in zip(paths, idents, lanes, strict=True):
            fd, now = lane.run(_open, path, timeout=read_timeout)
            fds.append(fd)
            _check(path, ident, now)
        bufs = [bytearray(min(BLOCK, step)) for _ in paths]
        out: list[Any] = []
        pos = start
        while pos < end:
            sub_end = min(end, (pos // step + 1) * step)
            acc: Any = None
            while pos < sub_end:
                n = min(len(bufs[0]), sub_end - pos)
                arrays = []
                for fd, buf, lane in zip(fds, bufs, lanes, strict=True):
                    view = memoryview(buf)[:n]
                    got = lane.run(_pread_full, fd, view, pos, timeout=read_timeout)
                    arrays.append(np.frombuffer(buf, np.uint8, got))
                part = fn(*arrays)
                acc = part if acc is None else reduce(acc, part)
                pos += n
            out.append(acc)
        for path, ident, fd, lane in zip(paths, idents, fds, lanes, strict=True):
            _check(path, ident, lane.run(_fstat_identity, fd, timeout=read_timeout))
        return out
    finally:
        for fd in fds:
            os.close(fd)


def _check(path: str, want: Sequence[int], now: Sequence[int]) -> None:
    if tuple(want) != tuple(now):
        raise FileChanged(
            f"{path} changed during the job (size {want[1]} -> {now[1]}, mtime_ns "
            f"{want[2]} -> {now[2]}, inode {want[0]} -> {now[0]}): its results would mix "
            f"two versions")
