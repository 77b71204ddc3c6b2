"""``rpg hub serve``: the hub as a long-lived service that clients and several users call.

One process, one loop (the main thread's): the front (rpg/hub/front.py: zerorpc for clients,
users, limits) and one ``Hub`` per session (the hub the embedded Session runs, with its own
zerorpc endpoint for its agents and its own lanes), all greenlets of that loop. One loop, not a
thread per session: ten sessions' loops on two cores waited on each other for the GIL (their
lag p99 was 277 ms with ten clients; see bench/hub_service.py). Sessions live here,
not in their clients: a client may die, re-attach, or detach. SIGTERM, SIGINT or ``rpg hub
stop`` end it cleanly: every session's pilots stopped, unfinished units CANCELED ("hub
stopped"), every process reaped.

The sandbox ``DIR`` (private, 0700) holds ``access.json`` (the owner's access, 0600),
``users.json`` (token hashes) and ``sessions/<uid>/`` (each session's sandbox, profile and
journal). A service killed without a clean stop (SIGKILL, a crash) and started again on the
same sandbox brings back every session that was not closed, from its journal
(rpg/hub/journal.py, rpg/hub/restore.py), on the same addresses: clients and agents carry on.
"""

from __future__ import annotations

import fcntl
import gc
import getpass
import itertools
import os
import signal
import time
from collections import OrderedDict
from typing import Any

import gevent
import gevent.event
import zerorpc
import zmq

from rpg import internals
from rpg.hub.events import EventLog
from rpg.hub.front import Front, SessionEntry
from rpg.hub.hub import Hub
from rpg.hub.journal import JOURNAL, restore
from rpg.hub.restore import rebuild, resume
from rpg.hub.session_api import SessionAPI
from rpg.hub.users import ACCESS_FILE, Users, access, read_access_file, write_private_json
from rpg.internals import route_loop_errors
from rpg.io_pool import IOPool, LoopWatch
from rpg.log import SparseWarning, get_logger
from rpg.rpc import no_zero_copy
from rpg.sandbox import make_private_dir
from rpg.states import Why

LOOPBACK = ("127.0.0.1", "localhost")  # zmq here binds no IPv6 unless told
MAX_MESSAGE = 64 << 20  # bytes: zmq drops a peer that sends more in one message (it is decoded
# on the loop before any token is checked: ~12 ms per MB)
USERS_RELOAD_S = 0.5
CLOSE_TIMEOUT = 30.0  # graceful part of each session's close when the service stops
MAX_UNITS_PER_USER = 200000


class ServeError(RuntimeError):
    """The service cannot start; the message names the option and the problem."""


def check_address(address: str) -> str:
    if not address.startswith("tcp://"):
        raise ServeError(f"--address must be tcp://HOST:PORT, got {address!r}")
    host, colon, port = address[len("tcp://"):].rpartition(":")
    if not colon:
        raise ServeError(f"--address {address}: no port (tcp://127.0.0.1:PORT; 0 for any)")
    if host not in LOOPBACK:
        raise ServeError(
            f"--address {address}: the hub binds loopback addresses only (its tokens would "
            f"cross the network in clear, and rpg offers no CurveZMQ); reach it from another "
            f"machine over SSH: Session(hub='ssh://user@host/DIR/access.json')")
    if port != "*" and not (port.isdigit() and 0 <= int(port) < 65536):
        raise ServeError(f"--address {address}: bad port {port!r}")
    return f"tcp://{host}:*" if port in ("0", "") else address


class HubServer:
    def __init__(self, sandbox: str, address: str | None = None,
                 max_units_per_user: int = MAX_UNITS_PER_USER,
                 dashboard: str | None = None, journal: bool = True) -> None:
        if dashboard is not None:
            from rpg.dashboard import DashboardError, parse_address

            try:
                parse_address(dashboard)
            except DashboardError as exc:
                raise ServeError(f"--{exc}") from None
        self.dashboard_address = dashboard
        self.dashboard: Any = None
        if max_units_per_user < 1:
            raise ServeError(f"--max-units-per-user must be at least 1, got "
                             f"{max_units_per_user}")
        self.sandbox = os.path.abspath(os.path.expanduser(sandbox))
        self.requested = check_address(address) if address else None
        self.max_units_per_user = max_units_per_user
        self.journaled = journal  # False: --no-journal (a restart brings nothing back)
        self.owner = getpass.getuser()
        self.users = Users(self.sandbox)
        self.sessions: dict[str, SessionEntry] = {}
        self.opened: OrderedDict[str, SessionEntry] = OrderedDict()  # request -> its session
        self.address = ""
        self.log = get_logger("hub_service", sandbox=self.sandbox)
        self._ids = itertools.count()
        self._stop = gevent.event.Event()
        self.watch: Any = None
        self.pool: Any = None
        self._last_reload = 0.0

    # -- sessions --------------------------------------------------------------------------------

    def _holds_work(self) -> bool:
        """Does any session hold units not yet final? (The loop-lag ticker rests otherwise.)"""
        return any(e.hub.holds_work() for e in self.sessions.values())

    def open_session(self, user: str, uid: str | None) -> SessionEntry:
        uid = uid or "rpg.session.{}.{}.{:04d}".format(
            time.strftime("%Y%m%d-%H%M%S"), os.getpid(), next(self._ids))
        hub = Hub(uid, os.path.join(self.sandbox, "sessions", uid), "tcp://127.0.0.1:0",
                  EventLog(), host=(gevent.get_hub().loop, self.watch))
        hub.agents_follow_hub_process = False  # agents outlive a hub restart (heartbeats)
        entry = SessionEntry(SessionAPI(hub), user)
        self.sessions[uid] = entry
        try:
            hub.start()  # on this loop: waits cooperatively
            out = os.path.join(hub.sandbox, "client", "out")  # client:// outputs land here
            self.pool.for_path(hub.sandbox).run(os.makedirs, out, 0o700, True, timeout=30)
            if self.journaled:
                hub.open_journal().add("session", {"uid": uid, "owner": user,
                                                   "address": hub.address,
                                                   "created": time.time()})
        except BaseException:
            del self.sessions[uid]
            hub.close(5.0)  # a no-op if it never started
            raise
        self.log.info("session_opened", session=uid, user=user)
        return entry

    def close_session(self, entry: SessionEntry, timeout: float, why: Why) -> None:
        journal = entry.hub.journal
        if journal is not None and not journal.closed and why != Why.HUB_STOPPED:
            journal.add("closing")  # a restart finishes the close
        entry.hub.close(timeout, why)  # on this loop: waits cooperatively; journals "closed"
        self.log.info("session_ended", session=entry.api.uid, user=entry.owner, why=why.value)

    def restore_sessions(self) -> None:
        """Every session whose journal does not say it closed comes back, on the agents'
        address it had. One that cannot (its journal unreadable, its port taken) is logged and
        left on disk."""
        root = os.path.join(self.sandbox, "sessions")
        lane = self.pool.for_path(root)
        for uid in sorted(lane.run(os.listdir, root, timeout=30)):
            path = os.path.join(root, uid, JOURNAL)
            if not lane.run(os.path.exists, path, timeout=30):
                continue
            t0 = time.monotonic()
            try:
                r = lane.run(restore, path, timeout=300)
            except Exception as exc:
                self.log.error("session_not_restored", session=uid, error=str(exc))
                continue
            if r.closed:
                continue
            try:
                entry = self._restore_session(uid, r)
            except Exception as exc:
                self.log.error("session_not_restored", session=uid, error=str(exc))
                continue
            self.log.info("session_back", session=uid, user=entry.owner,
                          units=len(r.units), seconds=round(time.monotonic() - t0, 3),
                          torn_bytes=r.torn)
            if r.closing:
                gevent.spawn(self.close_session, entry, CLOSE_TIMEOUT, Why.SESSION_CLOSED)

    def _restore_session(self, uid: str, r: Any) -> SessionEntry:
        info = r.session
        hub = Hub(uid, os.path.join(self.sandbox, "sessions", uid), str(info["address"]),
                  EventLog(r.events), host=(gevent.get_hub().loop, self.watch))
        hub.agents_follow_hub_process = False
        hub.restored = r
        rebuild(hub, r)  # before the agents' endpoint binds: a pilot calling in is known
        entry = SessionEntry(SessionAPI(hub), str(info["owner"]))
        entry.api.pilot_uids.update(r.pilots)
        entry.replies.update(r.replies)
        entry.accepted_units = len(r.units)
        hub.start()
        try:
            hub.open_journal(good=r.good)
            resume(hub, r)
        except BaseException:
            hub.close(5.0)
            raise
        hub.restored = None
        self.sessions[uid] = entry
        for key in r.opened:
            self.opened[key] = entry
        return entry

    # -- the service -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def _access_token(self, path: str) -> str:
        """The owner's token: kept from an access file of an earlier run that still matches
        users.json (clients keep working across a restart), else a new one."""
        old = read_access_file(path)
        token = old.get("token") if old else None
        if isinstance(token, str) and self.users.who(token) == self.owner:
            return token
        return self.users.add(self.owner)

    def _bind(self, server: Any, old: dict[str, Any] | None) -> None:
        wanted = self.requested
        if wanted is None and old and isinstance(old.get("address"), str):
            try:  # the address of the last run, so that access files stay good
                server.bind(check_address(old["address"]))
                self.address = internals.bound_address(server)
                return
            except Exception:
                pass
        server.bind(wanted or "tcp://127.0.0.1:*")
        self.address = internals.bound_address(server)

    def serve(self, ready: Any = None) -> int:
        """Run until SIGTERM, SIGINT or ``stop``; 0 once everything is stopped."""
        make_private_dir(self.sandbox, "hub sandbox")
        lock = self._lock_sandbox()
        try:
            return self._serve(ready)
        finally:
            os.close(lock)

    def _lock_sandbox(self) -> int:
        """One service per sandbox: a second would take over its access file."""
        path = os.path.join(self.sandbox, "serve.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ServeError(f"--sandbox {self.sandbox}: a hub service runs there already "
                             f"(pid {other}); stop it first (rpg hub stop --hub "
                             f"{os.path.join(self.sandbox, ACCESS_FILE)})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd

    def _serve(self, ready: Any) -> int:
        make_private_dir(os.path.join(self.sandbox, "sessions"), "hub sessions directory")
        self.users.reload()
        access_path = os.path.join(self.sandbox, ACCESS_FILE)
        old = read_access_file(access_path)
        token = self._access_token(access_path)
        self.watch = LoopWatch("hub-front", busy=self._holds_work).start()
        self.pool = IOPool()
        ctx = zerorpc.Context()
        front = Front(self)
        server = zerorpc.Server(front, context=ctx, heartbeat=5)
        no_zero_copy(server)
        internals.zmq_socket(server).setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        route_loop_errors(gevent.get_hub(), SparseWarning(self.log, "greenlet_failed"))
        handlers = []
        try:
            try:
                self._bind(server, old)
            except Exception as exc:
                raise ServeError(f"--address {self.requested}: cannot bind: {exc}") from None
            self.restore_sessions()  # before clients are served: they find their sessions
            write_private_json(access_path, access(self.address, token, self.owner))
            g = gevent.spawn(server.run)
            reload_g = gevent.spawn(self._reload_users)
            if self.dashboard_address is not None:
                self._start_dashboard(self.dashboard_address)
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers.append(gevent.signal_handler(sig, self.stop))
            # What is loaded by now lives as long as the process: out of the collector's
            # sight, so that a full collection walks only what sessions made.
            gc.freeze()
            self.log.info("hub_serving", address=self.address, access=access_path,
                          owner=self.owner)
            if ready is not None:
                ready(self.address, access_path)
            self._stop.wait()
            self.log.info("hub_service_stopping", sessions=len(self.sessions))
            # every session, also one whose close a client began: each close waits for the
            # hub's end (a second close waits for the first)
            gevent.joinall([gevent.spawn(self.close_session, e, CLOSE_TIMEOUT, Why.HUB_STOPPED)
                            for e in list(self.sessions.values())])
            reload_g.kill()
            g.kill()
        finally:
            for h in handlers:
                h.cancel()
            if self.dashboard is not None:
                self.dashboard.stop()
            server.close()
            ctx.destroy(linger=0)
            self.pool.close(wait=2.0)
            self.watch.stop()
        self.log.info("hub_service_stopped")
        return 0

    def _start_dashboard(self, address: str) -> None:
        """One page for every session: a user's token shows that user's sessions, the
        owner's all of them."""
        from rpg.dashboard import Dashboard, DashboardError

        def resolve(token: str) -> list[Any] | None:
            user = self.users.who(token) if len(token) <= 256 else None
            if user is None and self.reload_users_now():
                user = self.users.who(token)
            if user is None:
                return None
            return [e.hub for e in list(self.sessions.values())
                    if user == self.owner or e.owner == user]

        board = Dashboard(address, resolve, lambda: [e.hub for e in
                                                     list(self.sessions.values())], "service")
        try:
            board.start()
        except DashboardError as exc:
            raise ServeError(f"--{exc}") from None
        self.dashboard = board

    def reload_users_now(self) -> bool:
        """On a token not known: read users.json again now (at most every 0.1 s), so a token
        `rpg hub token` just made works at once. True if it changed."""
        now = time.monotonic()
        if now - self._last_reload < 0.1:
            return False
        self._last_reload = now
        try:
            return self.pool.for_path(self.users.path).run(self.users.reload, timeout=10)
        except Exception as exc:
            self.log.error("users_reload_failed", error=str(exc))
            return False

    def _reload_users(self) -> None:
        """A token added or revoked by ``rpg hub token`` counts within USERS_RELOAD_S."""
        lane = self.pool.for_path(self.users.path)
        while True:
            gevent.sleep(USERS_RELOAD_S)
            try:
                lane.run(self.users.reload, timeout=10)
            except Exception as exc:
                self.log.error("users_reload_failed", error=str(exc))
