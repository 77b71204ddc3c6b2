"""A hub service session's journal: what it needs to come back after a crash (SIGKILL).

``rpg hub serve`` journals each session to ``sessions/<uid>/journal``: every request that
changes it (managers, pilots and units submitted with their descriptions and tokens, pilots
added to unit managers, cancels, the replies kept for request ids) and every event of its
stream, in order. Records are msgpack frames, ``<length><crc32><payload>``, appended; a reader
stops at the first frame that is short or does not check (the process was killed mid-write),
and the writer cuts the file back there before it appends again.

Write-ahead: what the hub tells the outside (a reply to a client's call, a pull that hands
units to an agent, the acknowledgement of an agent's push, the events a client reads) waits
until the records behind it are in the file (``sync``). Records are written in batches, in the
session's disk lane, by one greenlet: whatever was added while one write ran goes in the next
(group commit). A write reaches the kernel (``os.write``), not the platter: it survives the
hub being killed, not the machine losing power.

``restore`` reads a journal back into what ``Hub.restore`` makes the session from: the requests
replayed, the units' and pilots' states from the events (rpg/hub/hub.py, resume).
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from typing import Any, Callable

import gevent
import gevent.event
import msgpack

from rpg.log import get_logger

JOURNAL = "journal"
FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
MAX_RECORD = 1 << 30
SYNC_TIMEOUT = 60.0


class JournalError(RuntimeError):
    """The journal cannot be written (or read): names the file and the problem."""


def _pack(record: Any) -> bytes:
    payload = msgpack.packb(record, use_bin_type=True)
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_batch(fd: int, records: list[Any], end: int) -> int:
    """In a lane: pack and append ``records``; a failed write is cut back to ``end`` (the
    file's size before it), so no torn record stays in the middle. Returns the new size."""
    data = b"".join(_pack(r) for r in records)
    try:
        _write_all(fd, data)
    except BaseException:
        try:
            os.ftruncate(fd, end)
        except OSError:
            pass
        raise
    return end + len(data)


def read_journal(path: str) -> tuple[list[Any], int, int]:
    """The records of a journal up to its last whole one; its good length and its size.
    Blocking (a lane's work)."""
    with open(path, "rb") as fh:
        data = fh.read()
    records, pos = [], 0
    while pos + FRAME.size <= len(data):
        length, crc = FRAME.unpack_from(data, pos)
        start = pos + FRAME.size
        if length > MAX_RECORD or start + length > len(data):
            break
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            break
        try:
            records.append(msgpack.unpackb(payload, raw=False, strict_map_key=False))
        except Exception:
            break
        pos = start + length
    return records, pos, len(data)


def _open_for_append(path: str, good: int | None) -> tuple[int, int]:
    """Open (0600) for appending; cut a torn tail back to ``good`` first. Blocking."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    size = os.fstat(fd).st_size
    if good is not None and good < size:
        os.ftruncate(fd, good)
        size = good
    os.lseek(fd, size, os.SEEK_SET)
    return fd, size


class Journal:
    """The writer (hub loop only): ``add`` is cheap (the record is packed at write time, in
    the lane); ``sync`` waits until all added so far is written."""

    def __init__(self, path: str, lane: Any, good: int | None = None,
                 on_written: Callable[[int], None] | None = None) -> None:
        self.path = path
        self._lane = lane
        self._fd, self._size = lane.run(_open_for_append, path, good, timeout=30)
        self._pending: list[Any] = []
        self._marks: list[Any] = []  # on_written's argument as each pending batch is taken
        self.added = 0  # records added
        self.written = 0  # of those, in the file
        self.bytes = self._size
        self.writes = 0
        self._on_written = on_written  # called with mark() of the last batch written
        self.mark: Callable[[], int] = lambda: 0
        self._wake = gevent.event.Event()
        self._done = gevent.event.Event()  # set (and replaced) after each write
        self.error: str | None = None
        self.closed = False
        self.log = get_logger("journal", path=path)
        self._writer = gevent.spawn(self._write_loop)

    def add(self, *record: Any) -> None:
        if self.closed:
            self.log.error("journal_record_after_close", kind=record[0])
            return
        self._pending.append(list(record))
        self.added += 1
        self._wake.set()

    def sync(self, timeout: float = SYNC_TIMEOUT) -> None:
        """Wait (on the loop) until every record added so far is in the file. Raises
        JournalError if it cannot be written within ``timeout``."""
        target = self.added
        deadline = time.monotonic() + timeout
        while self.written < target:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise JournalError(f"journal {self.path}: not written within {timeout:.0f} s"
                                   + (f" ({self.error})" if self.error else ""))
            self._done.wait(min(left, 1.0))

    def _write_loop(self) -> None:
        delay = 0.05
        while True:
            self._wake.wait()
            self._wake.clear()
            gevent.sleep(0)  # what this loop iteration adds goes in the same write
            batch, self._pending = self._pending, []
            mark = self.mark()
            try:
                self._size = self._lane.run(_write_batch, self._fd, batch, self._size,
                                            timeout=SYNC_TIMEOUT)
            except gevent.GreenletExit:
                self._pending[:0] = batch
                raise
            except Exception as exc:  # a full disk: keep them, in order, and try again
                self._pending[:0] = batch
                self.error = f"{type(exc).__name__}: {exc}"
                self.log.error("journal_write_failed", error=self.error, records=len(batch))
                gevent.sleep(delay)
                delay = min(2.0, delay * 2)
                self._wake.set()
                continue
            delay = 0.05
            self.error = None
            self.written += len(batch)
            self.bytes = self._size
            self.writes += 1
            if self._on_written is not None:
                self._on_written(mark)
            done, self._done = self._done, gevent.event.Event()
            done.set()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending (up to ``timeout`` s), then stop and close the file."""
        if self.closed:
            return
        try:
            self.sync(timeout)
        except JournalError as exc:
            self.log.error("journal_not_flushed_at_close", error=str(exc),
                           records_lost=self.added - self.written)
        self.closed = True
        self._writer.kill(block=True, timeout=5)
        try:
            self._lane.run(os.close, self._fd, timeout=10)
        except Exception as exc:
            self.log.warning("journal_close_failed", error=str(exc))


def _uid_number(uid: str) -> int:
    tail = uid.rpartition(".")[2]
    return int(tail) if tail.isdigit() else -1


class Restored:
    """A session as its journal left it: the requests replayed, the events in order."""

    def __init__(self) -> None:
        self.session: dict[str, Any] = {}
        self.opened: list[str] = []  # open_session request keys
        self.managers: dict[str, str] = {}
        self.pilots: dict[str, list[Any]] = {}  # uid -> [pmgr, desc, token, created]
        self.units: dict[str, list[Any]] = {}  # uid -> [umgr, desc, created]
        self.umgr_pilots: dict[str, list[str]] = {}
        self.events: list[tuple] = []
        self.canceled_units: set[str] = set()  # the application asked (kept in order)
        self.canceled_pilots: set[str] = set()
        self.replies: dict[str, tuple[Any, Any]] = {}  # request key -> (what, reply)
        self.closing = False  # a close had begun
        self.closed = False
        self.last_uid = -1
        self.torn = 0  # bytes after the last whole record
        self.good = 0  # bytes up to it: where the writer appends again

    def apply(self, rec: list[Any]) -> None:
        kind = rec[0]
        if kind == "ev":
            self.events.append(tuple(rec[1:]))
        elif kind == "units":
            _, umgr, created, items = rec
            for uid, desc in items:
                self.units[uid] = [umgr, desc, created]
                self.last_uid = max(self.last_uid, _uid_number(uid))
        elif kind == "pilots":
            _, pmgr, created, items = rec
            for uid, desc, token in items:
                self.pilots[uid] = [pmgr, desc, token, created]
                self.last_uid = max(self.last_uid, _uid_number(uid))
        elif kind == "mgr":
            self.managers[rec[1]] = rec[2]
            self.last_uid = max(self.last_uid, _uid_number(rec[1]))
        elif kind == "add":
            lst = self.umgr_pilots.setdefault(rec[1], [])
            lst.extend(u for u in rec[2] if u not in lst)
        elif kind == "remove":
            self.umgr_pilots[rec[1]] = [u for u in self.umgr_pilots.get(rec[1], [])
                                        if u not in rec[2]]
        elif kind == "cancel_units":
            uids, umgr = rec[1], rec[2]
            self.canceled_units.update(
                uids if uids is not None else
                [u for u, v in self.units.items() if umgr is None or v[0] == umgr])
        elif kind == "cancel_pilots":
            uids, pmgr = rec[1], rec[2]
            self.canceled_pilots.update(
                uids if uids is not None else
                [u for u, v in self.pilots.items() if pmgr is None or v[0] == pmgr])
        elif kind == "reply":
            what = rec[2]  # as it was kept: a tuple (msgpack gave a list)
            self.replies[rec[1]] = (tuple(what) if isinstance(what, list) else what, rec[3])
        elif kind == "opened":
            self.opened.append(rec[1])
        elif kind == "session":
            self.session = rec[1]
        elif kind == "closing":
            self.closing = True
        elif kind == "closed":
            self.closed = True


def restore(path: str) -> Restored:
    """Read a journal (blocking: a lane's work) into a Restored."""
    records, good, size = read_journal(path)
    out = Restored()
    for rec in records:
        out.apply(rec)
    out.torn, out.good = size - good, good
    if not out.session:
        raise JournalError(f"journal {path}: no session record (of {size} bytes, "
                           f"{good} readable)")
    return out
