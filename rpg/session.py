"""Session: the client side, the same for both places of the hub (its managers: rpg/managers.py).

Every public call is thread-safe and returns at once: it is a call of the client protocol
(rpg/client.py) to the session's hub, embedded in this process or a hub service. State changes
come back as the hub's numbered event stream, which the session's applier thread applies to the
Unit and Pilot objects (rpg/entities.py; in order, each state once) before the callbacks run.
"""

from __future__ import annotations

import atexit
import itertools
import os
import secrets
import time
import weakref
from typing import Any, Sequence
from urllib.parse import quote

import gevent
import gevent.event

from rpg import client, internals, states, threads
from rpg.callbacks import LoopDelivery, ThreadDelivery
from rpg.client import SessionClosed, SessionError
from rpg.description import PilotDescription, UnitDescription
from rpg.entities import Pilot, Unit, _Entity
from rpg.hub.events import EventLog
from rpg.hub.hub import Hub, HubError
from rpg.hub.session_api import SessionAPI
from rpg.log import get_logger
from rpg.managers import PilotManager, UnitManager, _Manager
from rpg.signals import hold_sigterm as _hold_sigterm
from rpg.signals import release_sigterm as _release_sigterm

__all__ = ["Pilot", "PilotManager", "Session", "SessionClosed", "SessionError", "Unit",
           "UnitManager"]

_session_ids = itertools.count()
_open_sessions: "weakref.WeakSet[Session]" = weakref.WeakSet()
_closing_sessions: "set[Session]" = set()  # close begun, not finished (strong: exit waits)
EVENT_BATCH = 4096
ORPHANS_MAX = 200_000  # events kept for objects this client did not make
CLOSE_RECONNECT_S = 15.0  # close() does not wait reconnect_timeout for a hub that is gone
CALLBACK_TIMEOUT = 5.0  # how long close() goes on delivering callbacks already queued
ATEXIT_TIMEOUT = 20.0


def _close_open_sessions() -> None:
    """At interpreter exit, close what the application left open, and wait for closes still
    under way (one begun in a callback): agents and units stopped, rpg's threads ended while
    the interpreter is still whole (a thread of a torn-down interpreter crashes it)."""
    for s in list(_open_sessions):
        try:  # a session of a hub service goes on there: re-attach to it with its uid
            if s.hub is None:
                s.detach(callback_timeout=1.0)
            else:
                s.close(timeout=ATEXIT_TIMEOUT, callback_timeout=1.0)
        except Exception:
            pass
    for s in list(_closing_sessions):
        s._close_done.wait(ATEXIT_TIMEOUT + 60.0)


atexit.register(_close_open_sessions)


class Session:
    """A session: its hub, and the applier thread that brings the hub's event stream onto the
    Unit and Pilot objects (waiters woken) and hands the callbacks to their delivery
    (rpg/callbacks.py), so a slow callback never holds back a state.

    ``Session()`` runs its own hub in a thread of this process (the default: no service to
    start). ``Session(hub="DIR/access.json")`` (or ``"ssh://user@host/DIR/access.json"``) opens
    a session on a hub service (``rpg hub serve``); ``attach=SESSION_UID`` re-attaches to one
    of the user's sessions there. Both go through the same client protocol (rpg/client.py).
    ``ssh_key`` and ``known_hosts`` are for an ``ssh://`` hub (default: ~/.ssh's); a dropped
    connection to a hub service is retried for ``reconnect_timeout`` s.
    """

    def __init__(self, sandbox: str | None = None,
                 hub_address: str = "tcp://127.0.0.1:0", uid: str | None = None,
                 hub: str | None = None, attach: str | None = None,
                 reconnect_timeout: float = client.RECONNECT_TIMEOUT,
                 ssh_key: str | None = None, known_hosts: str | None = None,
                 dashboard: str | None = None) -> None:
        self._cond = threads.Condition()
        self._coop_waiters: list[tuple[Any, Any]] = []  # (gevent loop, gevent Event)
        self._objects: dict[str, _Entity] = {}
        self._orphans: dict[str, list[Any]] = {}  # events of objects not made here yet
        self._orphan_count = 0
        self._apply_lock = threads.Lock()  # the applier's fetch+apply, and _adopt's
        self.events_dropped = 0
        self._managers: list[_Manager] = []
        self._seen = 0  # events of the stream applied so far
        self._closed = False
        self._detached = False
        self._stop_stream = False
        self._stream_ended = False
        self._close_lock = threads.Lock()
        self._close_done = threads.Event()
        self.hub: Hub | None = None
        self._remote_dashboard_url: str | None = None
        if hub is None:
            if attach is not None:
                raise SessionError("attach: an embedded session lives and dies with its "
                                   "application; attach to a session of a hub service "
                                   "(Session(hub=..., attach=...))")
            self._start_embedded(sandbox, hub_address, uid, dashboard)
        else:
            if sandbox is not None:
                raise SessionError("sandbox: a session on a hub service has its sandbox on "
                                   "the hub (under its --sandbox)")
            if dashboard is not None:
                raise SessionError("dashboard: a hub service serves one dashboard for all its "
                                   "sessions (rpg hub serve --dashboard HOST:PORT); "
                                   "session.dashboard_url gives its address")
            self._t = client.connect(hub, reconnect_timeout, ssh_key, known_hosts)
            self._start_remote(attach, uid)
        self.log = get_logger("session", session=self.uid)
        self._applier = threads.Thread(self._apply_loop, f"rpg-events-{self.uid}")
        self._delivery: Any = (LoopDelivery(self.log) if threads.application_patched() else
                               ThreadDelivery(f"rpg-callbacks-{self.uid}", self.log))
        self._applier.start()
        self._sigterm = _hold_sigterm()
        _open_sessions.add(self)
        self.log.info("session_started", sandbox=self.sandbox, hub=self.hub_address,
                      attached=attach is not None)

    def _start_embedded(self, sandbox: str | None, hub_address: str, uid: str | None,
                        dashboard: str | None) -> None:
        self.uid = uid or "rpg.session.{}.{}.{:04d}".format(
            time.strftime("%Y%m%d-%H%M%S"), os.getpid(), next(_session_ids))
        self.sandbox = os.path.abspath(os.path.expanduser(
            sandbox or os.path.join(os.getcwd(), self.uid)))
        if dashboard is not None:
            from rpg.dashboard import DashboardError, parse_address

            try:
                parse_address(dashboard)
            except DashboardError as exc:
                raise SessionError(str(exc)) from None
        self.hub = Hub(self.uid, self.sandbox, hub_address, EventLog(), dashboard=dashboard)
        try:
            self.hub.start()
        except HubError as exc:
            raise SessionError(str(exc)) from exc.__cause__
        self._t: Any = client.InProcess(SessionAPI(self.hub))
        self._profile = self.hub.profile.path
        self._address = self.hub.address

    def _start_remote(self, attach: str | None, uid: str | None) -> None:
        t = self._t
        try:
            if attach is None:
                opened = t.hub_call("open_session", {"uid": uid} if uid else {},
                                    secrets.token_hex(8))
            else:
                opened = t.hub_call("attach", attach)
            t.session = self.uid = opened["uid"]
            t.sandbox = self.sandbox = opened["sandbox"]
            self._profile = opened["profile"]
            self._address = t.address
            board = getattr(t, "dashboard", None)
            self._remote_dashboard_url = (
                f"{board}?token={quote(t.token)}&session={quote(self.uid)}" if board else None)
            self.user = opened["user"]
            if attach is not None:
                self._rebuild(t.call("snapshot"))
        except BaseException:
            t.close()
            raise

    def _rebuild(self, snap: dict[str, Any]) -> None:
        """An attached session's managers and objects, with their histories replayed from the
        stream (no callbacks: none is registered yet)."""
        mgrs: dict[str, _Manager] = {}
        for uid, kind in snap["managers"]:
            mgrs[uid] = (PilotManager if kind == "pilot" else UnitManager)(self, _uid=uid)
        made: list[_Entity] = []
        for rows, cls, desc_cls in ((snap["pilots"], Pilot, PilotDescription),
                                    (snap["units"], Unit, UnitDescription)):
            for uid, mgr_uid, desc, created in rows:
                mgr = mgrs.get(mgr_uid)
                if mgr is None:
                    continue
                obj = cls(uid, desc_cls(desc), mgr)
                obj.history[0] = (states.NEW, created)
                mgr._mine[uid] = obj
                made.append(obj)
        self._adopt(made)
        while self._seen < snap["seq"]:
            evs, ended = self._t.events(self._seen, EVENT_BATCH, 0.0)
            self._apply(evs)
            if ended or not evs:
                break

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
        """The session's profile (on the hub's machine, for a session of a hub service)."""
        return self._profile

    @property
    def hub_address(self) -> str | None:
        return self._address

    @property
    def dashboard_url(self) -> str | None:
        """The live dashboard's page, with the token it needs (None: no dashboard). Embedded:
        ``Session(dashboard="127.0.0.1:0")``; on a hub service: its ``--dashboard``, with
        this user's token and this session picked."""
        if self.hub is not None:
            return self.hub.dashboard_url
        return self._remote_dashboard_url

    @property
    def reconnects(self) -> int:
        """Calls made again after the connection to a hub service dropped (0 if embedded)."""
        return getattr(self._t, "reconnects", 0)

    def get_pilot_managers(self) -> list["PilotManager"]:
        return [m for m in self._managers if isinstance(m, PilotManager)]

    def get_unit_managers(self) -> list["UnitManager"]:
        return [m for m in self._managers if isinstance(m, UnitManager)]

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosed(f"session {self.uid} is "
                                f"{'detached' if self._detached else 'closed'}")

    def _call(self, method: str, *args: Any) -> Any:
        """A call of the client protocol (rpg/client.py); SessionClosed once closed."""
        self._check_open()
        return self._t.call(method, *args)

    # -- events ----------------------------------------------------------------------------------

    def _apply_loop(self) -> None:
        """Read the event stream from where it stands, apply it, until it ends (close) or the
        session detaches."""
        while not self._stop_stream:
            try:
                evs, ended = self._t.events(self._seen, EVENT_BATCH, 1.0)
            except SessionError as exc:  # the hub stayed unreachable past reconnect_timeout
                self.log.error("event_stream_lost", error=str(exc), seen=self._seen)
                break
            if evs:
                with self._apply_lock:
                    self._fetch_outputs(evs)
                    self._apply(evs)
            if ended:
                self._stream_ended = True  # the hub closed the session (or stopped)
                break
        with self._cond:
            self._cond.notify_all()
            for loop, waiter in self._coop_waiters:
                loop.run_callback_threadsafe(waiter.set)

    def _fetch_outputs(self, evs: list[Any]) -> None:
        """client:// outputs of units that are DONE, fetched before DONE is applied (a
        session of a hub service; the embedded hub writes them in place)."""
        if self._t.remote:
            for ev in evs:
                if ev[2] == states.DONE and ev[0] == "unit":
                    obj = self._objects.get(ev[1])
                    if obj is not None and obj.description.output_staging:
                        self._t.fetch_outputs(obj)

    def _apply(self, evs: list[Any]) -> None:
        """Apply events to the objects, wake waiters, queue the callbacks (under the lock, so
        events applied by ``_adopt`` on another thread keep their order)."""
        calls = []
        with self._cond:
            for ev in evs:
                _kind, uid, state, ts, fields = ev
                obj = self._objects.get(uid)
                if obj is None:  # made by a call whose reply has not been adopted yet
                    self._orphan(ev)
                    continue
                obj._apply(state, ts, fields)
                if obj._mgr._callbacks:
                    calls.append((obj, state))
            self._seen += len(evs)
            self._cond.notify_all()
            for loop, waiter in self._coop_waiters:
                loop.run_callback_threadsafe(waiter.set)
            if calls:
                self._delivery.put(calls)

    def _orphan(self, ev: Any) -> None:
        """Keep an event of an object this client has not made (yet): its call's reply is on
        the way, or another client attached to the session made it (seen at the next attach;
        those are bounded: the oldest are dropped, counted in ``events_dropped``)."""
        if self._orphan_count >= ORPHANS_MAX:
            dropped = len(self._orphans.pop(next(iter(self._orphans))))
            self.events_dropped += dropped
            self._orphan_count -= dropped
        self._orphans.setdefault(ev[1], []).append(ev)
        self._orphan_count += 1

    def _adopt(self, objs: Sequence[_Entity]) -> None:
        """Objects a call made: known from now on; events that came before them apply now
        (client:// outputs of one already DONE fetched first, as the applier would)."""
        with self._apply_lock:  # the applier neither fetches nor applies meanwhile
            with self._cond:
                for obj in objs:
                    self._objects[obj.uid] = obj
                early = [(obj, self._orphans.pop(obj.uid)) for obj in objs
                         if obj.uid in self._orphans]
                self._orphan_count -= sum(len(evs) for _obj, evs in early)
            for _obj, evs in early:
                self._fetch_outputs(evs)
            calls = []
            with self._cond:
                for obj, evs in early:
                    for _kind, _uid, state, ts, fields in evs:
                        obj._apply(state, ts, fields)
                        if obj._mgr._callbacks:
                            calls.append((obj, state))
                if early:
                    self._cond.notify_all()
                    for loop, waiter in self._coop_waiters:
                        loop.run_callback_threadsafe(waiter.set)
                if calls:
                    self._delivery.put(calls)

    def _wait(self, objs: Sequence[_Entity], state: str | Sequence[str] | None,
              timeout: float | None) -> list[str]:
        """Wait until every object is in ``state`` or final (``asked_states`` checked it)."""
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
                    if i >= len(objs) or not self._applier.is_alive():
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

    # -- close and detach ------------------------------------------------------------------------

    def close(self, timeout: float = 60.0, callback_timeout: float = CALLBACK_TIMEOUT) -> None:
        """End the session: agents, unit processes, threads, sockets stopped. Idempotent.

        ``timeout`` bounds how long agents may take to leave on their own; what is left is then
        killed and reaped, and every unit and pilot object has its final state when close
        returns. Callbacks already queued go on being delivered for up to ``callback_timeout``
        s; the rest are dropped (counted in ``callbacks_dropped``). A second close (another
        thread, or ``with`` after a close in a callback) waits for the first to finish.
        """
        if not self._begin_end():
            if not self._delivery.is_current():
                self._wait_closed(max(0.0, timeout) + 120.0)
            return
        try:
            if self.hub is not None:
                self.hub.close(timeout=timeout)
            elif not self._stream_ended:
                self._t.reconnect_timeout = min(self._t.reconnect_timeout, CLOSE_RECONNECT_S)
                try:
                    self._t.call("close_session", float(max(0.0, timeout)))
                except SessionError as exc:
                    self.log.error("session_close_failed", error=str(exc))
                    self._stop_stream = True
        finally:
            self._end(timeout, callback_timeout)
        self.log.info("session_closed", callbacks_dropped=self.callbacks_dropped)

    def detach(self, callback_timeout: float = CALLBACK_TIMEOUT) -> str:
        """Leave the session running on its hub service (fire and forget) and stop this
        client; returns the session uid to ``attach`` to later."""
        if self.hub is not None:
            raise SessionError("detach: an embedded session ends with its application; open "
                               "it on a hub service (Session(hub=...)) to leave work running")
        if self._begin_end():
            self._detached = True
            self._stop_stream = True
            self._end(10.0, callback_timeout)
            self.log.info("session_detached")
        return self.uid

    def _begin_end(self) -> bool:
        with self._close_lock:
            first = not self._closed
            self._closed = True
            if first:
                _closing_sessions.add(self)
        if first:
            _open_sessions.discard(self)
        return first

    def _end(self, timeout: float, callback_timeout: float) -> None:
        try:
            if getattr(self, "_sigterm", False):
                _release_sigterm()
            self._applier.join(timeout + 10.0)
            self._delivery.stop(callback_timeout)
            if self.callbacks_dropped:
                self.log.warning("callbacks_dropped_at_close", count=self.callbacks_dropped)
            self._t.close()
        finally:
            self._close_done.set()
            _closing_sessions.discard(self)

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
