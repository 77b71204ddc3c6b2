"""The Unit and Pilot objects the application holds: uid, state, history, wait, cancel.

They change only in the session's applier thread (rpg/session.py), under the session's lock,
from the hub's event stream; the application reads them.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

from rpg import calls, states
from rpg.description import PilotDescription, UnitDescription


class _Entity:
    """What Unit and Pilot share: uid, state, history, wait, cancel."""

    _kind = ""
    _states: frozenset[str] = frozenset()

    def __init__(self, uid: str, mgr: Any) -> None:
        self.uid = uid
        self.state = states.NEW
        self.reason: str | None = None
        self.reason_code: str | None = None  # what decided it (rpg.states.Why), beside the words
        self.history: list[tuple[str, float]] = [(states.NEW, time.time())]
        self._mgr = mgr

    def _apply(self, state: str, ts: float, fields: dict[str, Any]) -> None:
        self.state = state
        self.history.append((state, ts))
        for k, v in fields.items():
            if k in self._fields:
                setattr(self, k, v)

    _fields: frozenset[str] = frozenset()

    @property
    def final(self) -> bool:
        return self.state in states.FINAL

    def wait(self, state: str | Sequence[str] | None = None,
             timeout: float | None = None) -> str:
        """Wait until this reaches ``state`` (default: a final state) or any final state."""
        asked_states(self, state)
        return self._mgr._session._wait([self], state, timeout)[0]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uid} {self.state}>"


class Unit(_Entity):
    _kind = "unit"
    _states = states.UNIT_STATES
    _fields = frozenset({"exit_code", "stdout", "stderr", "sandbox", "pilot", "reason",
                         "reason_code", "restarts", "retried", "results"})

    def __init__(self, uid: str, description: UnitDescription, mgr: Any) -> None:
        super().__init__(uid, mgr)
        self.description = description
        self.name = description.name
        self.exit_code: int | None = None
        self.stdout: str | None = None
        self.stderr: str | None = None
        self.sandbox: str | None = None
        self.pilot: str | None = None
        self.restarts = 0  # times it started over (its pilot ended under it, or a retry)
        self.retried = 0  # of those, failed attempts run again (UnitDescription.retries)
        # A function unit's outcomes as they came ([status, data, text, seconds] per call,
        # rpg/calls.py); ``result`` and ``exception`` unpickle them here, on first use.
        self.results: list[list[Any]] | None = None
        self._decoded: dict[str, Any] = {}

    def _apply(self, state: str, ts: float, fields: dict[str, Any]) -> None:
        if state == states.NEW:  # a restart (its pilot died) or a retry: it starts over
            self.pilot = self.sandbox = self.results = None
        if "results" in fields:
            self._decoded = {}
        super()._apply(state, ts, fields)

    @property
    def result(self) -> Any:
        """A function unit's return value (None until DONE, or if it failed). For ``calls``,
        the list of values, with the exception object in place of a call that raised."""
        if self.results is None:
            return None
        if "result" not in self._decoded:
            if self.description.function is not None:
                r = self.results[0]
                self._decoded["result"] = calls.value(r) if r[0] == calls.OK else None
            else:
                self._decoded["result"] = [calls.value(r) if r[0] == calls.OK
                                           else calls.exception(r) for r in self.results]
        return self._decoded["result"]

    @property
    def exception(self) -> BaseException | None:
        """The exception a function unit's function raised (rebuilt here where it can be, else
        ``rpg.FunctionError``), with the remote traceback as its ``__cause__``; or why its
        call did not finish (its worker died, a timeout). None if it returned."""
        if self.results is None or self.description.function is None:
            return None
        if "exception" not in self._decoded:
            self._decoded["exception"] = calls.exception(self.results[0])
        return self._decoded["exception"]

    def follow(self, name: str | None = None, poll: float = 0.2, chunk: int = 64 * 1024,
               timeout: float | None = None) -> Iterator[bytes]:
        """The bytes of a file in this unit's sandbox as they are written (``name``: its
        stdout file by default, or any sandbox-relative file), from the start, in order, in
        chunks of at most ``chunk`` bytes; it ends once the unit has ended and all is read
        (or after ``timeout`` s). From the embedded session and from a hub service's client
        alike; a name that leaves the sandbox, or a link, raises ValueError."""
        name = name or self.description.stdout
        offset = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        session = self._mgr._session
        while True:
            r = session._t.call("read_output", self.uid, name, offset, int(chunk))
            data = r["data"]
            if data:
                offset = r["offset"]
                yield bytes(data)
            if r["eof"]:
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            if not data:
                time.sleep(poll)

    def cancel(self) -> None:
        """Ask for this unit to be canceled; returns at once."""
        self._mgr.cancel_units([self.uid])


class Pilot(_Entity):
    _kind = "pilot"
    _states = states.PILOT_STATES
    _fields = frozenset({"reason", "reason_code", "sandbox", "pid", "host"})

    def __init__(self, uid: str, description: PilotDescription, mgr: Any) -> None:
        super().__init__(uid, mgr)
        self.description = description
        self.sandbox: str | None = None
        self.pid: int | None = None
        self.host: str | None = None

    def cancel(self) -> None:
        """Ask for this pilot to be canceled (its units end CANCELED); returns at once."""
        self._mgr.cancel_pilots([self.uid])


def asked_states(entity: Any, state: str | Sequence[str] | None) -> set[str]:
    """The states a wait asked for, each checked against the table of the entity's kind."""
    if state is None:
        return set()
    asked = {state} if isinstance(state, str) else set(state)
    known = entity._states
    for s in sorted(asked, key=str):
        if s not in known:
            raise ValueError(f"wait: unknown {entity._kind} state {s!r} "
                             f"(known: {', '.join(sorted(known))})")
    return asked
