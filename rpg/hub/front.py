"""The hub service's front: the zerorpc methods clients call (the protocol in the README).

Every call starts with the caller's token; the front finds the user (rpg/hub/users.py) before it
touches anything, checks that the session named is that user's, and validates every argument.
A refused call raises ``Unauthorized``, ``ProtocolError`` or ``LimitExceeded`` (zerorpc hands the
name and message to the caller), changes nothing, and is counted. What a call may do to a
session is ``SessionAPI``'s (rpg/hub/session_api.py), the same the embedded Session calls.
Runs on the service's loop, with every session's hub.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any

import gevent
import gevent.lock

from rpg import gc_policy, states
from rpg.client import SessionClosed
from rpg.description import DescriptionError, PilotDescription, UnitDescription
from rpg.hub.hub import HubError
from rpg.hub.service import ProtocolError, require
from rpg.hub.session_api import EVENTS_MAX, SessionAPI
from rpg.io_pool import yield_to_loop
from rpg.log import SparseWarning
from rpg.staging import relay

if TYPE_CHECKING:
    from rpg.hub.serve import HubServer

PROTOCOL = 1
MAX_ITEMS = 20000  # descriptions one submit may carry
MAX_UIDS = 100000  # uids one cancel may carry
SUBMITS_AT_ONCE = 4  # per user: more wait (back-pressure), then LimitExceeded
SUBMIT_QUEUE_S = 10.0  # well under the client's call timeout: it hears LimitExceeded
REPLIES_KEPT = 1024  # per session: a repeated request id gets its first reply
MAX_SESSIONS = 64  # sessions not closed, per user
# Calls whose reply waits for the journal (the others journal a reply of their own, _once)
JOURNALED = frozenset({"add_pilots", "remove_pilots", "cancel_units", "cancel_pilots"})
VALIDATE_SLICE = 200
UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


class Unauthorized(PermissionError):
    """A wrong or missing token, or another user's session."""


class LimitExceeded(RuntimeError):
    """A limit of the service (units in flight, concurrent submits)."""


def _uid(value: Any, what: str) -> str:
    require(isinstance(value, str) and UID.match(value) is not None,
           f"{what} must be a uid (letters, digits, '.', '_', '-'), got {str(value)[:70]!r}")
    return value


def _uids(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    require(isinstance(value, list) and len(value) <= MAX_UIDS,
           f"{what} must be null or a list of at most {MAX_UIDS} uids")
    return [_uid(v, f"{what}[{i}]") for i, v in enumerate(value)]


def _number(value: Any, what: str, low: float, high: float) -> float:
    require(not isinstance(value, bool) and isinstance(value, (int, float))
           and low <= value <= high, f"{what} must be a number in [{low}, {high}]")
    return float(value)


def _request_key(method: str, request_id: Any) -> str:
    require(isinstance(request_id, str) and 0 < len(request_id) <= 64,
           "request_id must be a string of 1-64 characters")
    return f"{method}:{request_id}"


def _same(kept: tuple[Any, Any], what: Any, request_id: str) -> Any:
    require(kept[0] == what, f"request_id {request_id!r} was used for another call (give each "
                            f"call a new one; repeat one only to repeat its call)")
    return kept[1]


class SessionEntry:
    """A session of the service: its hub, its owner, the replies to its recent requests."""

    def __init__(self, api: SessionAPI, owner: str) -> None:
        self.api = api
        self.owner = owner
        self.replies: OrderedDict[str, Any] = OrderedDict()
        self.accepted_units = 0

    @property
    def hub(self) -> Any:
        return self.api.hub

    def in_flight(self) -> int:
        return self.accepted_units - self.hub.ledger.units_final


class Front:
    """The methods zerorpc exposes to clients (public names only)."""

    def __init__(self, server: "HubServer") -> None:
        self._server = server
        self._submits: dict[str, gevent.lock.BoundedSemaphore] = {}
        self.refused: Counter = Counter()
        self._warn = SparseWarning(server.log, "client_call_refused")

    # -- checks ----------------------------------------------------------------------------------

    def _refuse(self, kind: str, exc: Exception) -> Exception:
        self.refused[kind] += 1
        self._warn(kind=kind, error=str(exc)[:200])
        return exc

    def _user(self, token: Any) -> str:
        if not isinstance(token, str) or not token:
            raise self._refuse("token", Unauthorized(
                "a token is required: the first argument of every call is the 'token' of an "
                "access file (rpg hub token --sandbox DIR NAME makes one)"))
        if len(token) > 256:
            raise self._refuse("token", Unauthorized(
                f"the token must be a string of 1-256 characters, got {len(token)}"))
        user = self._server.users.who(token)
        if user is None and self._server.reload_users_now():
            user = self._server.users.who(token)  # one made by `rpg hub token` just now
        if user is None:
            raise self._refuse("token", Unauthorized("unknown token (wrong, or revoked)"))
        return user

    def _entry(self, token: Any, session: Any, owner_too: bool = False) -> SessionEntry:
        """The caller's session; ``owner_too``: the hub's owner may act on anyone's."""
        user = self._user(token)
        try:
            uid = _uid(session, "session")
        except ProtocolError as exc:
            raise self._refuse("call", exc) from None
        entry = self._server.sessions.get(uid)
        if owner_too and entry is not None and user == self._server.owner:
            return entry
        if entry is None or entry.owner != user:  # the same words: existence is not told
            raise self._refuse("session", Unauthorized(f"no session {uid!r} of user {user!r}"))
        return entry

    def _call(self, entry: SessionEntry, method: str, *args: Any) -> Any:
        try:
            out = getattr(entry.api, method)(*args)
        except HubError:
            raise SessionClosed(f"session {entry.api.uid} is closed") from None
        if method in JOURNALED:
            entry.api.durable()  # write-ahead: the reply says it is done once it is written
        return out

    def _manager(self, entry: SessionEntry, uid: Any, kind: str) -> str:
        _uid(uid, f"{'pmgr' if kind == 'pilot' else 'umgr'}")
        require(entry.hub.managers.get(uid) == kind, f"no {kind} manager {uid!r} in session "
                                                    f"{entry.api.uid}")
        return uid

    def _once(self, entry: SessionEntry, method: str, request_id: Any, what: Any,
              make: Any) -> Any:
        """``make()``, or the reply it gave to the same request id of ``method`` before (if
        that was about the same ``what``: a request id reused for another call is refused)."""
        key = _request_key(method, request_id)
        if key in entry.replies:
            return _same(entry.replies[key], what, request_id)
        reply = make()
        entry.replies[key] = (what, reply)
        entry.api._journal("reply", key, what, reply)  # a retry after a restart: the same
        entry.api.durable()
        while len(entry.replies) > REPLIES_KEPT:
            entry.replies.popitem(last=False)
        return reply

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ProtocolError as exc:
            raise self._refuse("call", exc) from None

    # -- the hub ---------------------------------------------------------------------------------

    def hello(self, token: str) -> dict[str, Any]:
        """Who the token is, and the protocol version."""
        board = self._server.dashboard
        return {"user": self._user(token), "protocol": PROTOCOL,
                "address": self._server.address,
                "dashboard": board.url() if board is not None else None}

    def open_session(self, token: str, options: dict, request_id: str) -> dict[str, Any]:
        user = self._user(token)

        key = self._guard(_request_key, user, request_id)
        done = self._server.opened.get(key)
        if done is not None:  # a retry: the session this request opened
            return self._describe(done)

        def check() -> str | None:
            require(isinstance(options, dict) and set(options) <= {"uid"},
                   "options must be a dict with at most the key 'uid'")
            uid = options.get("uid")
            if uid is not None:
                _uid(uid, "options.uid")
                require(uid not in self._server.sessions, f"session {uid!r} exists already")
            return uid

        uid = self._guard(check)
        live = sum(1 for e in self._server.sessions.values()
                   if e.owner == user and not e.hub.closed)
        if live >= MAX_SESSIONS:
            raise self._refuse("limit", LimitExceeded(
                f"user {user}: {live} sessions open already (at most {MAX_SESSIONS}); close "
                f"some first"))
        entry = self._server.open_session(user, uid)
        self._server.opened[key] = entry
        entry.api._journal("opened", key)  # a retry after a restart gets this session
        entry.api.durable()
        while len(self._server.opened) > REPLIES_KEPT:
            self._server.opened.popitem(last=False)
        return self._describe(entry)

    def _describe(self, entry: SessionEntry) -> dict[str, Any]:
        hub = entry.hub
        return {"uid": hub.session_uid, "sandbox": hub.sandbox, "profile": hub.profile.path,
                "user": entry.owner, "closed": hub.closed}

    def attach(self, token: str, session: str) -> dict[str, Any]:
        return self._describe(self._entry(token, session))

    def list_sessions(self, token: str) -> list[dict[str, Any]]:
        user = self._user(token)
        return [self._describe(e) for e in self._server.sessions.values() if e.owner == user]

    def status(self, token: str) -> dict[str, Any]:
        """The user's sessions (all of them for the hub's owner), lanes and loop lag."""
        user = self._user(token)
        everyone = user == self._server.owner
        out = []
        for e in list(self._server.sessions.values()):
            if everyone or e.owner == user:
                d = self._describe(e)
                d["units"] = {st: n for st, n in e.hub.ledger.unit_counts.items() if n}
                d["pilots"] = [{"uid": p.uid, "state": p.state, "cores": p.cores,
                                "cores_in_use": p.load_cores} for p in
                               list(e.hub.pilots.values())]
                d["loop"] = e.hub.watch.stats() if e.hub.watch is not None else None
                d["lanes"] = e.hub.pool.health() if e.hub.pool is not None else {}
                out.append(d)
        return {"user": user, "owner": self._server.owner, "address": self._server.address,
                "sessions": out, "loop": self._server.watch.stats(),
                "gc": policy.stats() if (policy := gc_policy.installed()) is not None else None,
                "refused": dict(self.refused)}

    def stop_hub(self, token: str) -> dict[str, Any]:
        """Stop the service (the hub's owner only): as SIGTERM."""
        user = self._user(token)
        if user != self._server.owner:
            raise self._refuse("session", Unauthorized(
                f"only the hub's owner ({self._server.owner}) may stop it"))
        gevent.spawn_later(0.05, self._server.stop)
        return {"stopping": True}

    # -- a session -------------------------------------------------------------------------------

    def snapshot(self, token: str, session: str) -> dict[str, Any]:
        return self._entry(token, session).api.snapshot()

    def new_manager(self, token: str, session: str, kind: str, request_id: str) -> str:
        entry = self._entry(token, session)
        self._guard(require, kind in ("pilot", "unit"), "kind must be 'pilot' or 'unit'")
        return self._guard(self._once, entry, "new_manager", request_id, kind,
                           lambda: self._call(entry, "new_manager", kind))

    def submit_pilots(self, token: str, session: str, pmgr: str, descs: list,
                      request_id: str) -> list[str]:
        entry = self._entry(token, session)
        self._guard(self._manager, entry, pmgr, "pilot")
        checked = self._guard(self._descriptions, PilotDescription, descs)
        return self._guard(self._once, entry, "submit_pilots", request_id,
                           (pmgr, len(checked)),
                           lambda: self._call(entry, "submit_pilots", pmgr, checked))

    def submit_units(self, token: str, session: str, umgr: str, descs: list,
                     request_id: str) -> list[str]:
        entry = self._entry(token, session)
        self._guard(self._manager, entry, umgr, "unit")
        key = self._guard(_request_key, "submit_units", request_id)
        what = (umgr, len(descs) if isinstance(descs, list) else -1)
        if key in entry.replies:
            return self._guard(_same, entry.replies[key], what, request_id)
        sem = self._submits.setdefault(entry.owner, gevent.lock.BoundedSemaphore(
            SUBMITS_AT_ONCE))
        if not sem.acquire(timeout=SUBMIT_QUEUE_S):
            raise self._refuse("limit", LimitExceeded(
                f"user {entry.owner}: {SUBMITS_AT_ONCE} submits are being taken in already; "
                f"this one waited {SUBMIT_QUEUE_S:.0f} s"))
        try:
            checked = self._guard(self._descriptions, UnitDescription, descs)
            limit = self._server.max_units_per_user
            flying = sum(e.in_flight() for e in list(self._server.sessions.values())
                         if e.owner == entry.owner)
            if flying + len(checked) > limit:
                raise self._refuse("limit", LimitExceeded(
                    f"user {entry.owner}: {flying} units not final yet; {len(checked)} more "
                    f"would pass the limit of {limit} (rpg hub serve --max-units-per-user)"))

            def make() -> list[str]:
                uids = self._call(entry, "submit_units", umgr, checked)
                entry.accepted_units += len(uids)
                return uids

            return self._guard(self._once, entry, "submit_units", request_id, what, make)
        finally:
            sem.release()

    def _descriptions(self, cls: type, descs: Any) -> list[dict[str, Any]]:
        require(isinstance(descs, list) and len(descs) <= MAX_ITEMS,
               f"descriptions must be a list of at most {MAX_ITEMS}")
        out = []
        for i, d in enumerate(descs):
            if i and i % VALIDATE_SLICE == 0:
                yield_to_loop()  # a big submit must not hold the loop for the others
            require(isinstance(d, dict), f"descriptions[{i}] must be a dict")
            try:
                out.append(cls(d).as_dict())
            except DescriptionError as exc:
                raise ProtocolError(f"descriptions[{i}]: {exc}") from None
            except TypeError as exc:
                raise ProtocolError(f"descriptions[{i}]: {exc}") from None
        return out

    def add_pilots(self, token: str, session: str, umgr: str, pilots: list) -> None:
        entry = self._entry(token, session)
        self._guard(self._manager, entry, umgr, "unit")
        uids = self._guard(self._pilot_uids, entry, pilots)
        self._call(entry, "add_pilots", umgr, uids)

    def remove_pilots(self, token: str, session: str, umgr: str, pilots: list) -> None:
        entry = self._entry(token, session)
        self._guard(self._manager, entry, umgr, "unit")
        uids = self._guard(self._pilot_uids, entry, pilots)
        self._call(entry, "remove_pilots", umgr, uids)

    def _pilot_uids(self, entry: SessionEntry, pilots: Any) -> list[str]:
        uids = _uids(pilots, "pilots")
        require(uids is not None, "pilots must be a list of pilot uids")
        for uid in uids or ():
            require(uid in entry.api.pilot_uids, f"no pilot {uid!r} in session {entry.api.uid}")
        return uids or []

    def cancel_units(self, token: str, session: str, uids: Any, umgr: Any) -> None:
        self._cancel("cancel_units", "unit", token, session, uids, umgr)

    def cancel_pilots(self, token: str, session: str, uids: Any, pmgr: Any) -> None:
        self._cancel("cancel_pilots", "pilot", token, session, uids, pmgr)

    def _cancel(self, method: str, kind: str, token: str, session: str, uids: Any,
                mgr: Any) -> None:
        """Those ``uids`` (unknown ones ignored), or all of the manager's; returns at once."""
        entry = self._entry(token, session)
        uids = self._guard(_uids, uids, "uids")
        if mgr is not None:
            self._guard(self._manager, entry, mgr, kind)
        self._guard(require, uids is not None or mgr is not None,
                    f"{method} needs uids or a {'umgr' if kind == 'unit' else 'pmgr'}")
        self._call(entry, method, uids, mgr)

    def events(self, token: str, session: str, after: int, limit: int,
               wait: float) -> dict[str, Any]:
        """The session's events after number ``after`` (long poll up to ``wait`` s)."""
        entry = self._entry(token, session)
        self._guard(require, not isinstance(after, bool) and isinstance(after, int)
                    and after >= 0, "after must be an integer >= 0")
        self._guard(require, not isinstance(limit, bool) and isinstance(limit, int)
                    and 0 < limit <= EVENTS_MAX, f"limit must be an integer in [1, {EVENTS_MAX}]")
        wait = self._guard(_number, wait, "wait", 0, 10)
        evs, closed = entry.api.events(after, limit, wait)
        return {"events": evs, "closed": closed, "next": after + len(evs)}

    def read_output(self, token: str, session: str, uid: str, name: str, offset: int,
                    limit: int) -> dict[str, Any]:
        """Up to ``limit`` bytes of a unit's sandbox file from ``offset`` (Unit.follow)."""
        entry = self._entry(token, session)
        self._guard(_uid, uid, "uid")
        return self._guard(self._call, entry, "read_output", uid, name, offset, limit)

    def close_session(self, token: str, session: str, timeout: float) -> dict[str, Any]:
        """End the session: its pilots stopped, its unfinished units CANCELED. The hub's owner
        may close anyone's (a revoked user's sessions, say)."""
        entry = self._entry(token, session, owner_too=True)
        timeout = self._guard(_number, timeout, "timeout", 0, 3600)
        self._server.close_session(entry, timeout, states.Why.SESSION_CLOSED)
        return {"closed": True}


    # -- client:// files (rpg/staging/relay.py) ------------------------------------------------

    def _relay(self, entry: SessionEntry, fn: Any, *args: Any) -> Any:
        lane = self._server.pool.for_path(entry.hub.sandbox)
        try:
            return lane.run(fn, entry.hub.sandbox, *args, timeout=120)
        except relay.RelayError as exc:
            raise self._refuse("call", ProtocolError(str(exc))) from None

    def upload(self, token: str, session: str, name: str, tid: str, offset: int,
               data: bytes) -> int:
        """A chunk of upload ``tid`` of a client:// input (``name``: its sha256); returns the
        bytes held."""
        entry = self._entry(token, session)
        self._guard(require, isinstance(name, str), "name must be a string")
        self._guard(require, isinstance(tid, str), "tid must be a string")
        self._guard(require, not isinstance(offset, bool) and isinstance(offset, int)
                    and offset >= 0, "offset must be an integer >= 0")
        self._guard(require, isinstance(data, bytes) and len(data) <= relay.CHUNK,
                    f"data must be bytes, at most {relay.CHUNK}")
        return self._relay(entry, relay.write_chunk, name, tid, offset, data)

    def upload_done(self, token: str, session: str, name: str, tid: str) -> str:
        """Upload ``tid`` is whole: checked against its sha256; returns its path on the hub."""
        entry = self._entry(token, session)
        self._guard(require, isinstance(name, str), "name must be a string")
        self._guard(require, isinstance(tid, str), "tid must be a string")
        return self._relay(entry, relay.finish_upload, name, tid)

    def download(self, token: str, session: str, client_path: str, tid: str,
                 offset: int) -> dict[str, Any]:
        """Chunk ``offset`` of download ``tid`` of a unit's client:// output (in order; the
        last has ``eof`` and the sha256)."""
        entry = self._entry(token, session)
        self._guard(require, isinstance(client_path, str) and client_path.startswith("/")
                    and len(client_path) < 4096, "client_path must be an absolute path")
        self._guard(require, isinstance(tid, str), "tid must be a string")
        self._guard(require, not isinstance(offset, bool) and isinstance(offset, int)
                    and offset >= 0, "offset must be an integer >= 0")
        return self._relay(entry, relay.read_chunk, client_path, tid, offset)
