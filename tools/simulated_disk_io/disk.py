"""Simulated disks: which disk a request's path is on, and a simulated read that really blocks.

A simulated read is a real blocking OS call, never a gevent sleep: either the original (unpatched)
``time.sleep`` or, with ``stall="fifo"``, an ``open()`` + ``read()`` of a FIFO that has no writer
until a waker thread opens it after the delay. Both hold the calling thread (and, when called on
a gevent loop, the whole loop) exactly like a read from a dying disk does.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import tempfile
import threading
from time import monotonic
from typing import Literal

from rpg.io_pool import blocking

DEFAULT_DISK = "default"
StallKind = Literal["sleep", "fifo"]


def disk_of(path: bytes, default: str = DEFAULT_DISK) -> str:
    """The simulated disk of a request path: its first component (``sdb/objects/1`` -> ``sdb``).

    Leading slashes are ignored (``/sdb/x`` is on ``sdb`` too); a bare name (no slash after its
    first component) is on the ``default`` disk.
    """
    rel = path.lstrip(b"/")
    head, sep, _ = rel.partition(b"/")
    if not sep or not head:
        return default
    return head.decode("utf-8", "backslashreplace")


def disk_name(i: int) -> str:
    """Swift-like device names for the i-th simulated disk: sdb, sdc, ..., sdz, then d25, d26..."""
    return "sd" + chr(ord("b") + i) if i < 25 else f"d{i}"


class SimulatedDisks:
    """Performs simulated reads. ``read`` blocks the calling OS thread for ``ms`` milliseconds.

    With ``stall="fifo"``, reads of ``fifo_min_ms`` or more block in ``open()`` of a per-read
    FIFO in a private temp dir; a waker thread opens it for writing after the delay (or at once
    on ``close``, which is how a shutting-down server unsticks its lanes). Shorter reads, and
    every read with ``stall="sleep"``, use the unpatched ``time.sleep``.
    """

    def __init__(self, stall: StallKind = "sleep", fifo_min_ms: int = 1000) -> None:
        if stall not in ("sleep", "fifo"):
            raise ValueError(f"stall must be 'sleep' or 'fifo', not {stall!r}")
        if fifo_min_ms < 0:
            raise ValueError(f"fifo_min_ms must be >= 0, got {fifo_min_ms}")
        self.stall = stall
        self.fifo_min_ms = fifo_min_ms
        self._dir: str | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wakers: dict[int, tuple[threading.Event, threading.Thread]] = {}
        self._closed = False
        if stall == "fifo":
            self._dir = tempfile.mkdtemp(prefix="rpg-simdisk-")

    def read(self, ms: int) -> None:
        """Block this OS thread for ``ms`` milliseconds in a real blocking call."""
        if ms <= 0:
            return
        if self.stall == "fifo" and ms >= self.fifo_min_ms and not self._closed:
            self._fifo_read(ms)
        else:
            blocking.sleep(ms / 1000.0)

    def _fifo_read(self, ms: int) -> None:
        assert self._dir is not None
        n = next(self._ids)
        path = os.path.join(self._dir, f"stall-{n}")
        os.mkfifo(path, 0o600)
        wake = threading.Event()  # set: open the FIFO for writing now
        gone = threading.Event()  # set: the reader has left (done or failed)
        waker = threading.Thread(
            target=self._wake, args=(path, wake, gone, ms / 1000.0),
            name=f"simdisk-waker-{n}", daemon=True,
        )
        with self._lock:
            self._wakers[n] = (wake, waker)
            if self._closed:
                wake.set()
        try:
            waker.start()
            # Blocks in the kernel until the waker opens the FIFO for writing.
            fd = os.open(path, os.O_RDONLY)
            try:
                os.read(fd, 1)
            finally:
                os.close(fd)
        finally:
            gone.set()
            wake.set()
            if waker.ident is not None:
                waker.join()
            with self._lock:
                self._wakers.pop(n, None)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @staticmethod
    def _wake(path: str, wake: threading.Event, gone: threading.Event, delay: float) -> None:
        wake.wait(delay)
        # Non-blocking open for writing succeeds once the reader is in its blocking open();
        # until then (ENXIO) retry, unless the reader has already gone.
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno == errno.ENXIO and not gone.is_set():
                    blocking.sleep(0.001)
                    continue
                return
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
            return

    def pending(self) -> int:
        """FIFO reads still blocked."""
        with self._lock:
            return len(self._wakers)

    def close(self, wait: float = 5.0) -> None:
        """Release every blocked FIFO read now, wait (up to ``wait`` s) for the readers to finish,
        then remove the temp dir. Blocking: run it in a lane."""
        with self._lock:
            self._closed = True
            wakers = list(self._wakers.values())
        for wake, _ in wakers:
            wake.set()
        deadline = monotonic() + wait
        for _, waker in wakers:
            waker.join(timeout=max(0.0, deadline - monotonic()))
        while self.pending() and monotonic() < deadline:
            blocking.sleep(0.005)
        if self._dir is not None and not self.pending():
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
