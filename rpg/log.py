"""Logging (structlog, configured once) and the session profile writer.

rpg never reconfigures structlog behind an application's back: if the application configured
structlog first, rpg logs through that configuration. Otherwise rpg configures it once, with a
console renderer on a TTY and JSON lines elsewhere, at the level named by ``RPG_LOG_LEVEL``
(default ``warning``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import sys
import threading
import time as _time
from typing import Any

import structlog

from rpg.gc_policy import fields_of, flat_fields

_configured_lock = threading.Lock()
_configured = False

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure(level: str | None = None, force: bool = False) -> None:
    """Configure structlog for rpg, unless the application already did (or ``force``)."""
    global _configured
    with _configured_lock:
        if _configured and not force:
            return
        # zerorpc logs its recoveries and every exception a remote call raises (a rejected call
        # is routine for the hub) through stdlib logging; without a handler Python's last-resort
        # handler would print them on the application's stderr. rpg logs what matters itself.
        zlog = logging.getLogger("zerorpc")
        if not any(isinstance(h, logging.NullHandler) for h in zlog.handlers):
            zlog.addHandler(logging.NullHandler())
        if structlog.is_configured() and not force:
            _configured = True
            return
        name = (level or os.environ.get("RPG_LOG_LEVEL") or "warning").lower()
        if name not in LEVELS:
            raise ValueError(f"RPG_LOG_LEVEL: unknown level {name!r}; use one of {sorted(LEVELS)}")
        stream = sys.stderr
        renderer: Any
        if stream.isatty():
            renderer = structlog.dev.ConsoleRenderer(colors=False)
        else:
            renderer = structlog.processors.JSONRenderer()
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(LEVELS[name]),
            logger_factory=structlog.PrintLoggerFactory(stream),
            cache_logger_on_first_use=False,
        )
        _configured = True


def get_logger(component: str, **fields: Any) -> Any:
    """A structlog logger bound to an rpg component name."""
    configure()
    return structlog.get_logger("rpg").bind(component=component, **fields)


class SparseWarning:
    """A warning that a hostile or broken caller could repeat without end: the first ``burst``
    of each ``window`` seconds are logged, the rest counted and reported with the next one."""

    def __init__(self, log: Any, event: str, burst: int = 5, window: float = 1.0) -> None:
        self.log = log
        self.event = event
        self.burst = burst
        self.window = window
        self._start = 0.0
        self._in_window = 0
        self.suppressed = 0

    def __call__(self, **fields: Any) -> None:
        now = _time.monotonic()
        if now - self._start >= self.window:
            self._start, self._in_window = now, 0
        self._in_window += 1
        if self._in_window > self.burst:
            self.suppressed += 1
            return
        if self.suppressed:
            fields["suppressed"], self.suppressed = self.suppressed, 0
        self.log.warning(self.event, **fields)


BULKY = frozenset({"stdout", "stderr"})  # in the Unit object, not in the profile
SECRET_FIELDS = frozenset({"token", "secret", "password", "key", "private_key"})


def scrub(fields: dict[str, Any]) -> dict[str, Any]:
    """Drop values that must never reach a log or a profile (tokens, keys)."""
    return {k: ("<redacted>" if k in SECRET_FIELDS else v) for k, v in fields.items()}


# What the writer leaves in the profile where it had to drop events (see ProfileWriter.max_kept).
DROPPED_UID = "profile"
DROPPED_STATE = "EVENTS_DROPPED"


class ProfileWriteError(OSError):
    """A profile write failed; the events are kept (up to ``max_kept``) for the next flush."""


class ProfileWriter:
    """Buffers profile events (JSON lines) and appends them to the session's profile file.

    ``add`` is cheap and may be called on the hub loop; ``flush`` does the file write and must run
    in an io_pool lane (the hub's profile greenlet does that). A write that fails (a full disk,
    a file size limit) leaves no partial line: the file is cut back to its size before the
    write, and the events are kept, in order, for the next flush. If the disk stays full, at most
    ``max_kept`` events are kept; the oldest beyond that are dropped, counted in ``dropped``,
    logged, and marked in the file by one ``EVENTS_DROPPED`` record once writing works again.
    """

    def __init__(self, path: str, max_kept: int = 100_000) -> None:
        self.path = path
        self.max_kept = max_kept
        self._buf: list[tuple] = []
        self._kept: list[bytes] = []  # serialised lines a failed write left unwritten, in order
        self._lock = threading.Lock()
        self._log = get_logger("profile", path=path)
        self._dropped_unmarked = 0  # dropped since the last EVENTS_DROPPED record
        self.events_written = 0
        self.dropped = 0

    def add(self, time: float, uid: str, state: str, component: str, **extra: Any) -> None:
        # Cheap on the loop: the record is kept as a tuple and serialised at flush, in a lane;
        # its fields flat, so that the buffer counts toward no full collection (gc_policy).
        self._buf.append((time, uid, state, component, flat_fields(extra)))

    def pending(self) -> int:
        """Events not yet in the file: new ones and those a failed write kept."""
        return len(self._buf) + len(self._kept)

    def flush(self) -> int:
        """Write pending events; blocking (run it in a lane). Returns the number written.

        Raises ProfileWriteError (an OSError) if the write failed; the events are kept.
        """
        with self._lock:
            # Take what is there now without swapping the list: an add() racing on the hub
            # thread always appends to the same list, so nothing lands on a list we dropped.
            n = len(self._buf)
            new = self._buf[:n]
            del self._buf[:n]
            self._kept.extend(_line(ev) for ev in new)
            self._cap()
            if not self._kept:
                return 0
            lines = self._kept
            marker = b""
            if self._dropped_unmarked:
                marker = _line((_time.time(), DROPPED_UID, DROPPED_STATE, "profile",
                                {"dropped": self._dropped_unmarked}))
            written, exc = _append_whole_lines(self.path, marker, lines)
            if marker and written:  # the marker went first: it is in the file
                self._dropped_unmarked = 0
                written -= 1
            del self._kept[:written]
            self.events_written += written
            if exc is not None:
                raise ProfileWriteError(
                    exc.errno, f"profile {self.path}: {exc.strerror}; {len(self._kept)} events "
                    f"kept for the next flush, {self.dropped} dropped so far") from exc
            return written

    def _cap(self) -> None:
        over = len(self._kept) - self.max_kept
        if over > 0:
            del self._kept[:over]
            self.dropped += over
            self._dropped_unmarked += over
            self._log.warning("profile_events_dropped", dropped=over, dropped_total=self.dropped,
                              kept=len(self._kept),
                              why="profile writes keep failing; kept events are capped")


_HEAD_KEYS = frozenset({"time", "uid", "state", "component"})
_PLAIN: set[str] = set()  # strings seen to need no JSON escaping: uids, states, field names


def _plain(v: str) -> bool:
    """True if ``v`` goes into JSON as it is, between quotes (printable ASCII, no quote or
    backslash); remembered, as uids, states and field names come back many times."""
    if v in _PLAIN:
        return True
    if v.isascii() and v.isprintable() and '"' not in v and "\\" not in v:
        if len(_PLAIN) >= 100_000:
            _PLAIN.clear()
        _PLAIN.add(v)
        return True
    return False


def _fast_line(time: Any, uid: Any, state: Any, component: Any, extra: dict) -> bytes | None:
    """The common event (plain strings, ints, None) without json.dumps, 3x cheaper; json.loads
    reads back exactly what the general path writes. None: the general path must do it."""
    if type(time) is not float or type(uid) is not str or type(state) is not str or \
            type(component) is not str or not (_plain(uid) and _plain(state) and
                                               _plain(component)):
        return None
    line = f'{{"time": {round(time, 6)!r}, "uid": "{uid}", "state": "{state}", ' \
           f'"component": "{component}"'
    if extra:
        parts = [line]
        for k, v in extra.items():
            if k in BULKY:
                continue
            if type(k) is not str or k in _HEAD_KEYS or not _plain(k):
                return None
            t = type(v)
            if k in SECRET_FIELDS:
                text = '"<redacted>"'
            elif t is str and _plain(v):
                text = f'"{v}"'
            elif t is int:
                text = str(v)
            elif v is None:
                text = "null"
            else:
                return None
            parts.append(f', "{k}": {text}')
        line = "".join(parts)
    return (line + "}\n").encode("ascii")


def _line(ev: tuple) -> bytes:
    """One event as a JSON line; an event whose fields cannot be serialised is kept as text."""
    time, uid, state, component, extra = ev
    if type(extra) is tuple or extra is None:  # as add() keeps it
        extra = fields_of(extra)
    fast = _fast_line(time, uid, state, component, extra)
    if fast is not None:
        return fast
    try:
        rec = {"time": round(time, 6), "uid": uid, "state": state, "component": component}
        if extra:
            rec.update(scrub({k: v for k, v in extra.items() if k not in BULKY}))
        text = json.dumps(rec, default=str)
    except (TypeError, ValueError):  # e.g. a non-str key, a non-number time, a cycle
        rec = {"time": time if isinstance(time, (int, float)) else 0.0, "uid": str(uid),
               "state": str(state), "component": str(component),
               "unserialisable": repr(scrub({str(k): v for k, v in (extra or {}).items()
                                             if k not in BULKY}))[:4096]}
        text = json.dumps(rec, default=str)
    # ensure_ascii (json's default) makes the line ASCII even for lone surrogates
    return text.encode("ascii") + b"\n"


def _append_whole_lines(path: str, marker: bytes, lines: list[bytes]
                        ) -> tuple[int, OSError | None]:
    """Append ``marker`` then ``lines`` to ``path`` as one chunk, whole or not at all.

    Returns (lines of marker+lines now in the file, the error or None). On a failed write the
    file is cut back to its size before it; if even that fails, the whole lines that did reach
    the file are counted as written (so a retry cannot duplicate them) and the torn tail is ended
    by the next write's leading newline.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        return 0, exc
    try:
        before, lead = _end_of_whole_lines(fd)
        head = [marker] if marker else []
        chunk = lead + b"".join(head + lines)
        done = 0
        try:
            while done < len(chunk):
                done += os.write(fd, memoryview(chunk)[done:])
            return len(head) + len(lines), None
        except OSError as exc:
            if done == 0:
                return 0, exc
            try:
                os.ftruncate(fd, before)
                return 0, exc
            except OSError:
                return chunk.count(b"\n", len(lead), done), exc
    finally:
        os.close(fd)


def _end_of_whole_lines(fd: int) -> tuple[int, bytes]:
    """The file's size, and b"\\n" if it ends in a torn line (so ours start on a new line)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return st.st_size, b""
    try:
        last = os.pread(fd, 1, st.st_size - 1)
    except OSError:
        return st.st_size, b""
    return st.st_size, (b"" if last == b"\n" else b"\n")


def record_problem(rec: Any) -> str | None:
    """What is wrong with one profile record (None if it is usable): it must be a JSON object
    with a finite number ``time`` and string ``uid`` and ``state``."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    t = rec.get("time")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        return f"'time' must be a finite number, got {t!r}"[:200]
    for field in ("uid", "state"):
        if not isinstance(rec.get(field), str):
            return f"{field!r} must be a string, got {rec.get(field)!r}"[:200]
    if "component" in rec and not isinstance(rec["component"], str):
        return f"'component' must be a string, got {rec['component']!r}"[:200]
    return None


class ProfileRecords(list):
    """The usable records of a profile file (a list), with what was skipped: ``damaged`` lines
    (torn, not JSON, wrongly typed), the first ``problem`` found, and ``dropped``, the events
    the writer reported it had to drop (EVENTS_DROPPED records)."""

    def __init__(self) -> None:
        super().__init__()
        self.damaged = 0
        self.problem: str | None = None
        self.dropped = 0


def read_profile(path: str) -> ProfileRecords:
    """Read a profile file back (blocking; for reports and tests), skipping damaged lines.

    A torn line (a crash or a full disk mid-write), one that is not JSON or a record with
    wrongly typed fields is skipped and counted, not fatal. Raises OSError if the file cannot be
    read, ValueError if it has lines but not one usable record (it is not a profile).
    """
    out = ProfileRecords()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            raw = raw.strip()
            if not raw:
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
                problem = record_problem(rec)
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                problem = f"not JSON ({type(exc).__name__})"
            if problem is not None:
                out.damaged += 1
                if out.problem is None:
                    out.problem = f"line {lineno}: {problem}"
                continue
            if rec["uid"] == DROPPED_UID and rec["state"] == DROPPED_STATE:
                n = rec.get("dropped")
                out.dropped += n if isinstance(n, int) and not isinstance(n, bool) else 0
                continue
            out.append(rec)
    if out.damaged and not out:
        raise ValueError(f"no usable record; {out.damaged} damaged line"
                         f"{'s' if out.damaged != 1 else ''} (first: {out.problem})")
    return out
