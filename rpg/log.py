"""Logging (structlog, configured once) and the session profile writer.

rpg never reconfigures structlog behind an application's back: if the application configured
structlog first, rpg logs through that configuration. Otherwise rpg configures it once, with a
console renderer on a TTY and JSON lines elsewhere, at the level named by ``RPG_LOG_LEVEL``
(default ``warning``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any

import structlog

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


BULKY = frozenset({"stdout", "stderr"})  # in the Unit object, not in the profile
SECRET_FIELDS = frozenset({"token", "secret", "password", "key", "private_key"})


def scrub(fields: dict[str, Any]) -> dict[str, Any]:
    """Drop values that must never reach a log or a profile (tokens, keys)."""
    return {k: ("<redacted>" if k in SECRET_FIELDS else v) for k, v in fields.items()}


class ProfileWriter:
    """Buffers profile events (JSON lines) and appends them to the session's profile file.

    ``add`` is cheap and may be called on the hub loop; ``flush`` does the file write and must run
    in an io_pool lane (the hub's profile greenlet does that).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._buf: list[tuple] = []
        self._lock = threading.Lock()
        self.events_written = 0

    def add(self, time: float, uid: str, state: str, component: str, **extra: Any) -> None:
        # Cheap on the loop: the record is kept as a tuple and serialised at flush, in a lane.
        self._buf.append((time, uid, state, component, extra))

    def pending(self) -> int:
        return len(self._buf)

    def flush(self) -> int:
        """Write buffered events; blocking (run it in a lane). Returns the number written."""
        with self._lock:
            buf, self._buf = self._buf, []
            if not buf:
                return 0
            lines = []
            for time, uid, state, component, extra in buf:
                rec = {"time": round(time, 6), "uid": uid, "state": state,
                       "component": component}
                if extra:
                    rec.update(scrub({k: v for k, v in extra.items() if k not in BULKY}))
                lines.append(json.dumps(rec, default=str))
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
            self.events_written += len(lines)
            return len(lines)


def read_profile(path: str) -> list[dict[str, Any]]:
    """Read a profile file back (blocking; for reports and tests)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out
