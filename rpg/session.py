"""Session, PilotManager, UnitManager and the Unit/Pilot objects the application holds.

Every public call is thread-safe and returns at once: it hands work to the hub thread. State
changes come back as events, which the session's callback thread applies to the Unit and Pilot
objects (in order, each state once) before calling the application's callbacks.
"""

from __future__ import annotations

import atexit
import itertools
import os
import secrets
import signal
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Sequence, Union

import gevent
import gevent.event

from rpg import internals, states, threads
from rpg.callbacks import LoopDelivery, ThreadDelivery
from rpg.description import (
    DescriptionError,
    PilotDescription,
    UnitDescription,
    resolve_client_path,
    split_url,
)
from rpg.hub.hub import Hub, HubError
from rpg.log import get_logger

_session_ids = itertools.count()
_sigterm_lock = threads.Lock()
_open_sessions: "weakref.WeakSet[Session]" = weakref.WeakSet()
_closing_sessions: "set[Session]" = set()  # close begun, not finished (strong: exit waits)
EVENT_BATCH = 4096
CALLBACK_TIMEOUT = 5.0  # how long close() goes on delivering callbacks already queued
ATEXIT_TIMEOUT = 20.0


def _close_open_sessions() -> None:
    """At interpreter exit, close what the application left open, and wait for closes still
    under way (one begun in a callback): agents and units stopped, rpg's threads ended while
    the interpreter is still whole (a thread of a torn-down interpreter crashes it)."""
    for s in list(_open_sessions):
        try:
            s.close(timeout=ATEXIT_TIMEOUT, callback_timeout=1.0)
        except Exception:
            pass
    for s in list(_closing_sessions):
        s._close_done.wait(ATEXIT_TIMEOUT + 60.0)


atexit.register(_close_open_sessions)
_sigterm_users = 0


def _sigterm_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _hold_sigterm() -> bool:
    """While a session is open, SIGTERM unwinds the main thread (so ``with Session()`` closes
    cleanly: agents stopped, units canceled, profile flushed) instead of killing the process
    outright. Only when SIGTERM has its default action and we are on the main thread."""
    global _sigterm_users
    if threading.current_thread() is not threading.main_thread():
        return False
    with _sigterm_lock:
        current = signal.getsignal(signal.SIGTERM)
        if current is _sigterm_exit:
            _sigterm_users += 1
            return True
        if current != signal.SIG_DFL:
            return False
        signal.signal(signal.SIGTERM, _sigterm_exit)
        _sigterm_users = 1
        return True


def _release_sigterm() -> None:
    global _sigterm_users
    with _sigterm_lock:
        _sigterm_users -= 1
        if (_sigterm_users == 0 and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is _sigterm_exit):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
Callback = Callable[[Any, str], Any]


class SessionError(RuntimeError):
    """The session could not start (its sandbox is refused, the hub cannot bind, ...)."""


class SessionClosed(SessionError):
    """The session was closed; it accepts no more work."""


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
        _asked_states(self, state)
        return self._mgr._session._wait([self], state, timeout)[0]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uid} {self.state}>"


class Unit(_Entity):
    _kind = "unit"
    _states = states.UNIT_STATES
    _fields = frozenset({"exit_code", "stdout", "stderr", "sandbox", "pilot", "reason",
                         "reason_code", "restarts"})

    def __init__(self, uid: str, description: UnitDescription, mgr: "UnitManager") -> None:
        super().__init__(uid, mgr)
        self.description = description
        self.name = description.name
        self.exit_code: int | None = None
        self.stdout: str | None = None
        self.stderr: str | None = None
        self.sandbox: str | None = None
        self.pilot: str | None = None
        self.restarts = 0

    def _apply(self, state: str, ts: float, fields: dict[str, Any]) -> None:
        if state == states.NEW:  # a restart: its pilot died, it starts over
            self.pilot = self.sandbox = None
        super()._apply(state, ts, fields)

    def cancel(self) -> None:
        """Ask for this unit to be canceled; returns at once."""
        self._mgr.cancel_units([self.uid])


class Pilot(_Entity):
    _kind = "pilot"
    _states = states.PILOT_STATES
    _fields = frozenset({"reason", "reason_code", "sandbox", "pid", "host"})

    def __init__(self, uid: str, description: PilotDescription, mgr: "PilotManager") -> None:
        super().__init__(uid, mgr)
        self.description = description
        self.sandbox: str | None = None
        self.pid: int | None = None
        self.host: str | None = None

    def cancel(self) -> None:
        """Ask for this pilot to be canceled (its units end CANCELED); returns at once."""
        self._mgr.cancel_pilots([self.uid])


class Session:
    """A hub (own thread, own gevent loop, zerorpc on 127.0.0.1), the session's applier thread
    (the hub's state events onto the Unit and Pilot objects, waiters woken) and the delivery of
    callbacks apart from it (rpg/callbacks.py), so a slow callback never holds back a state."""

    def __init__(self, sandbox: str | None = None,
                 hub_address: str = "tcp://127.0.0.1:0", uid: str | None = None) -> None:
        self.uid = uid or "rpg.session.{}.{}.{:04d}".format(
            time.strftime("%Y%m%d-%H%M%S"), os.getpid(), next(_session_ids))
        self.sandbox = os.path.abspath(os.path.expanduser(
            sandbox or os.path.join(os.getcwd(), self.uid)))
        self.log = get_logger("session", session=self.uid)
        self._events: Any = threads.SimpleQueue()  # hub -> applier
        self._cond = threads.Condition()
        self._coop_waiters: list[tuple[Any, Any]] = []  # (gevent loop, gevent Event)
        self._objects: dict[str, _Entity] = {}
        self._ids = itertools.count()
        self._closed = False
        self._close_lock = threads.Lock()
        self._close_done = threads.Event()
        self.hub = Hub(self.uid, self.sandbox, hub_address, self._events)
        self._applier = threads.Thread(self._apply_loop, f"rpg-events-{self.uid}")
        self._delivery: Any = (LoopDelivery(self.log) if threads.application_patched() else
                               ThreadDelivery(f"rpg-callbacks-{self.uid}", self.log))
        self._applier.start()
        try:
            self.hub.start()
        except BaseException as exc:
            self._stop_threads(5.0, 0.0)
            if isinstance(exc, HubError):
                raise SessionError(str(exc)) from exc.__cause__
            raise
        self._sigterm = _hold_sigterm()
        _open_sessions.add(self)
        self.log.info("session_started", sandbox=self.sandbox, hub=self.hub.address)

    @property
    def callback_errors(self) -> int:
        """Callbacks that raised (logged, not fatal)."""
        return self._delivery.errors

    @property
    def callbacks_dropped(self) -> int:
        """Callbacks still queued when close() ran out of ``callback_timeout``."""
        return self._delivery.dropped

    @property
    def profile_path(self) -> str:
        return self.hub.profile.path

    @property
    def hub_address(self) -> str | None:
        return self.hub.address

    def _next_uid(self, prefix: str) -> str:
        return f"{prefix}.{next(self._ids):06d}"

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosed(f"session {self.uid} is closed")

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Hand a call to the hub; SessionClosed if the hub no longer takes calls."""
        try:
            self.hub.post(fn, *args)
        except HubError:
            raise SessionClosed(f"session {self.uid} is closed") from None

    # -- events ----------------------------------------------------------------------------------

    def _apply_loop(self) -> None:
        """Apply state events to the objects as they come, wake waiters, hand the callbacks on."""
        get, get_nowait, Empty = self._events.get, self._events.get_nowait, threads.Empty
        while True:
            batch = [get()]
            try:
                while len(batch) < EVENT_BATCH:
                    batch.append(get_nowait())
            except Empty:
                pass
            stop = False
            calls = []
            with self._cond:
                for ev in batch:
                    if ev is None:
                        stop = True
                        continue
                    _kind, uid, state, ts, fields = ev
                    obj = self._objects.get(uid)
                    if obj is None:
                        continue
                    obj._apply(state, ts, fields)
                    if obj._mgr._callbacks:
                        calls.append((obj, state))
                self._cond.notify_all()
                for loop, waiter in self._coop_waiters:
                    loop.run_callback_threadsafe(waiter.set)
            if calls:
                self._delivery.put(calls)
            if stop:
                return

    def _wait(self, objs: Sequence[_Entity], state: str | Sequence[str] | None,
              timeout: float | None) -> list[str]:
        """Wait until every object is in ``state`` or final (``_asked_states`` checked it)."""
        if self._delivery.is_current():
            raise RuntimeError("wait cannot be called from inside a callback (it would never "
                               "see the next state); use the callback itself")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float))
                                    or timeout != timeout or timeout < 0):
            raise ValueError(f"wait: timeout must be None or a number >= 0, got {timeout!r}")
        want = set(states.FINAL) | (set() if state is None else
                                    {state} if isinstance(state, str) else set(state))
        deadline = None if timeout is None else time.monotonic() + timeout
        # A thread that runs a gevent loop (a monkey-patched application, or one that uses gevent
        # itself) waits on that loop, woken by the applier: its other greenlets go on meanwhile.
        app_hub = internals.hub_of_this_thread()
        waiter = gevent.event.Event() if app_hub is not None else None
        entry = (app_hub.loop, waiter) if app_hub is not None else None
        i = 0
        try:
            while True:
                with self._cond:
                    while i < len(objs) and objs[i].state in want:
                        i += 1
                    if i >= len(objs) or (self._closed and not self._applier.is_alive()):
                        break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    step = 1.0 if remaining is None else min(1.0, remaining)
                    if waiter is None:
                        self._cond.wait(step)
                        continue
                    waiter.clear()
                    if entry not in self._coop_waiters:
                        self._coop_waiters.append(entry)
                waiter.wait(step)
        finally:
            if entry is not None:
                with self._cond:
                    if entry in self._coop_waiters:
                        self._coop_waiters.remove(entry)
        return [o.state for o in objs]

    # -- close -----------------------------------------------------------------------------------

    def close(self, timeout: float = 60.0, callback_timeout: float = CALLBACK_TIMEOUT) -> None:
        """Stop everything: agents, unit processes, threads, sockets. Idempotent.

        ``timeout`` bounds how long agents may take to leave on their own; what is left is then
        killed and reaped, and every unit and pilot object has its final state when close
        returns. Callbacks already queued go on being delivered for up to ``callback_timeout``
        s; the rest are dropped (counted in ``callbacks_dropped``). A second close (another
        thread, or ``with`` after a close in a callback) waits for the first to finish.
        """
        with self._close_lock:
            first = not self._closed
            self._closed = True
            if first:
                _closing_sessions.add(self)
        if not first:
            if not self._delivery.is_current():
                self._wait_closed(max(0.0, timeout) + 120.0)
            return
        _open_sessions.discard(self)
        try:
            self.hub.close(timeout=timeout)
        finally:
            if getattr(self, "_sigterm", False):
                _release_sigterm()
            self._stop_threads(timeout, callback_timeout)
            self._close_done.set()
            _closing_sessions.discard(self)
        self.log.info("session_closed", callbacks_dropped=self.callbacks_dropped)

    def _stop_threads(self, timeout: float, callback_timeout: float) -> None:
        self._events.put(None)
        self._applier.join(timeout)
        self._delivery.stop(callback_timeout)
        if self.callbacks_dropped:
            self.log.warning("callbacks_dropped_at_close", count=self.callbacks_dropped)

    def _wait_closed(self, timeout: float) -> None:
        """Wait for a close under way elsewhere; on a gevent loop, without freezing it."""
        if internals.hub_of_this_thread() is None:
            self._close_done.wait(timeout)
            return
        deadline = time.monotonic() + timeout
        while not self._close_done.wait(0.005) and time.monotonic() < deadline:
            gevent.sleep(0.02)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _asked_states(entity: Any, state: str | Sequence[str] | None) -> set[str]:
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


def _as_list(x: Any) -> tuple[list[Any], bool]:
    if isinstance(x, (list, tuple)):
        return list(x), True
    return [x], False


class _Manager:
    _prefix = ""
    _entity: Any = None

    def __init__(self, session: Session) -> None:
        session._check_open()
        self._session = session
        self.uid = session._next_uid(self._prefix)
        self._callbacks: list[Callback] = []
        self._mine: dict[str, _Entity] = {}

    def register_callback(self, cb: Callback) -> None:
        """Call ``cb(obj, state)`` on the callback thread at every state change."""
        if not callable(cb):
            raise TypeError(f"register_callback: {cb!r} is not callable")
        self._callbacks.append(cb)

    def _select(self, uids: str | Iterable[str] | None) -> list[Any]:
        if uids is None:
            return list(self._mine.values())
        if isinstance(uids, (str, _Entity)):
            uids = [uids]
        out = []
        for uid in uids:
            if isinstance(uid, _Entity):  # Unit/Pilot objects are welcome too
                uid = uid.uid
            if not isinstance(uid, str):
                raise TypeError(f"{type(self).__name__}: expected uids or {self._entity.__name__}"
                                f" objects, got {type(uid).__name__}")
            if uid not in self._mine:
                raise KeyError(f"{type(self).__name__}: unknown uid {uid!r}")
            out.append(self._mine[uid])
        return out

    def _accept(self, desc_cls: type, entity_cls: type, prefix: str,
                descriptions: Any) -> tuple[list[Any], bool]:
        """Validate every description first (one bad: none accepted), then make the objects."""
        s = self._session
        s._check_open()
        descs, many = _as_list(descriptions)
        checked = [_validated(desc_cls, d, i) for i, d in enumerate(descs)]
        objs = []
        for desc in checked:
            obj = entity_cls(s._next_uid(prefix), desc, self)
            s._objects[obj.uid] = obj
            self._mine[obj.uid] = obj
            objs.append(obj)
        return objs, many

    def _hand_over(self, objs: list[_Entity], fn: Callable[..., Any], *args: Any) -> None:
        """Post the accepted objects to the hub; if it no longer takes them (a close on another
        thread won the race), forget them again and raise SessionClosed: none half-submitted."""
        s = self._session
        try:
            s._post(fn, *args)
        except SessionClosed:
            for obj in objs:
                s._objects.pop(obj.uid, None)
                self._mine.pop(obj.uid, None)
            raise

    def _wait(self, uids: str | Iterable[str] | None, state: Any,
              timeout: float | None) -> list[str]:
        _asked_states(self._entity, state)
        return self._session._wait(self._select(uids), state, timeout)


class PilotManager(_Manager):
    _prefix = "pmgr"
    _entity = Pilot

    def submit_pilots(self, descriptions: Union[PilotDescription, dict, Sequence[Any]]
                      ) -> Union[Pilot, list[Pilot]]:
        """Launch pilots; returns at once with Pilot objects (state NEW)."""
        s = self._session
        pilots, many = self._accept(PilotDescription, Pilot, "pilot", descriptions)
        items = [(p.uid, p.description.as_dict(), secrets.token_urlsafe(32)) for p in pilots]
        self._hand_over(pilots, s.hub.submit_pilots, self.uid, items)
        return pilots if many else pilots[0]

    def wait_pilots(self, uids: str | Iterable[str] | None = None,
                    state: str | Sequence[str] | None = None,
                    timeout: float | None = None) -> list[str]:
        return self._wait(uids, state, timeout)

    def cancel_pilots(self, uids: str | Iterable[str] | None = None) -> None:
        """Cancel pilots (all of this manager's by default); returns at once."""
        s = self._session
        if s._closed:
            return
        targets = [p.uid for p in self._select(uids)]
        try:
            s._post(s.hub.cancel_pilots, targets)
        except SessionClosed:
            pass  # close cancels them anyway

    def get_pilots(self, uids: str | Iterable[str] | None = None) -> list[Pilot]:
        return self._select(uids)


class UnitManager(_Manager):
    _prefix = "umgr"
    _entity = Unit

    def add_pilots(self, pilots: Union[Pilot, Sequence[Pilot]]) -> None:
        """Units of this manager may run on these pilots."""
        s = self._session
        s._check_open()
        lst, _ = _as_list(pilots)
        for p in lst:
            if not isinstance(p, Pilot):
                raise TypeError(f"add_pilots: expected Pilot objects, got {type(p).__name__}")
            if p._mgr._session is not s:
                raise ValueError(f"add_pilots: pilot {p.uid} belongs to another session "
                                 f"({p._mgr._session.uid}); a unit manager takes the pilots "
                                 f"of its own session only")
        s._post(s.hub.add_pilots, self.uid, [p.uid for p in lst])

    def remove_pilots(self, pilots: Union[Pilot, Sequence[Pilot]]) -> None:
        s = self._session
        s._check_open()
        lst, _ = _as_list(pilots)
        s._post(s.hub.remove_pilots, self.uid, [p.uid for p in lst])

    def submit_units(self, descriptions: Union[UnitDescription, dict, Sequence[Any]]
                     ) -> Union[Unit, list[Unit]]:
        """Submit units; returns at once with Unit objects (state NEW).

        All descriptions are validated first: if one is bad, none is submitted and the error
        names its index and field.
        """
        s = self._session
        units, many = self._accept(UnitDescription, Unit, "unit", descriptions)
        items = []
        for u in units:
            d = u.description.as_dict()
            _resolve_client_paths(d)
            items.append((u.uid, d))
        self._hand_over(units, s.hub.submit_units, self.uid, items)
        return units if many else units[0]

    def wait_units(self, uids: str | Iterable[str] | None = None,
                   state: str | Sequence[str] | None = None,
                   timeout: float | None = None) -> list[str]:
        """Wait until the units reach ``state`` (default: final) or a final state.

        Returns their states (some may not be there yet if ``timeout`` ran out).
        """
        return self._wait(uids, state, timeout)

    def cancel_units(self, uids: str | Iterable[str] | None = None) -> None:
        """Cancel units (all of this manager's by default). Never blocks; works in callbacks."""
        s = self._session
        if s._closed:
            return
        args: tuple = (None, self.uid) if uids is None else ([u.uid for u in self._select(uids)],)
        try:
            s._post(s.hub.cancel_units, *args)
        except SessionClosed:
            pass  # close cancels them anyway

    def get_units(self, uids: str | Iterable[str] | None = None) -> list[Unit]:
        return self._select(uids)


def _validated(cls: type, d: Any, index: int) -> Any:
    try:
        if isinstance(d, cls):
            d.validate()
            return d
        if isinstance(d, dict):
            return cls(d)
    except DescriptionError as exc:
        raise DescriptionError(f"{exc.where} #{index}", exc.field, exc.problem) from None
    raise TypeError(f"#{index}: expected a {cls.__name__} or a dict, got {type(d).__name__}")


def _resolve_client_paths(d: dict[str, Any]) -> None:
    """client:// paths are relative to the application's cwd: make them absolute now."""
    for key, side in (("input_staging", "source"), ("output_staging", "target")):
        for directive in d[key]:
            if split_url(directive[side])[0] == "client":
                directive[side] = "client://" + resolve_client_path(directive[side])
