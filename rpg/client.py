"""The client side of the one client protocol, with its two transports.

A Session does everything through ``transport.call(method, *args)`` and reads its event stream
with ``transport.events(after, limit, wait)``. ``InProcess`` calls the embedded hub's
``SessionAPI`` directly; ``Remote`` makes the same calls over zerorpc to ``rpg hub serve``,
with the access token and the session uid in front of the arguments (the protocol the README
documents), from a thread of its own that runs a gevent loop. A Remote call whose connection
drops is made again, on a new connection, until ``reconnect_timeout``: calls that make objects
carry a request id, so the hub answers a repeated one with its first reply, and the event
stream resumes from the last sequence number seen, so nothing is missed or repeated.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any, Callable

import gevent
import gevent.event
import zerorpc

from rpg import threads
from rpg.description import DescriptionError, resolve_client_path, split_url
from rpg.hub.hub import HubError
from rpg.log import get_logger
from rpg.rpc import no_linger, no_zero_copy
from rpg.staging import relay

CALL_TIMEOUT = 30.0  # one call, hub side included (a submit of 20,000 units takes ~1 s)
CLOSE_MARGIN = 120.0  # a close_session waits for its timeout, then the hub's forced stop
EVENTS_WAIT = 2.0  # the long poll of the event stream
RECONNECT_TIMEOUT = 120.0  # how long a dropped hub is retried before calls fail
SUBMIT_SLICE = 10000  # descriptions per submit call (the hub takes at most 20,000)


class SessionError(RuntimeError):
    """The session could not start (its sandbox is refused, the hub cannot bind, ...)."""


class SessionClosed(SessionError):
    """The session was closed; it accepts no more work."""


class HubRefused(SessionError, ValueError):
    """The hub service refused a call: a bad argument, a limit, or no such session."""


class Unauthorized(SessionError, PermissionError):
    """The hub service refused the token, or the session belongs to another user."""


class HubUnreachable(SessionError, ConnectionError):
    """The hub service did not answer within ``reconnect_timeout``."""


_REMOTE_ERRORS: dict[str, type[SessionError]] = {
    "SessionClosed": SessionClosed, "Unauthorized": Unauthorized, "ProtocolError": HubRefused,
    "LimitExceeded": HubRefused}


class InProcess:
    """The embedded hub: calls go straight to its SessionAPI (which posts to its loop)."""

    remote = False

    def __init__(self, api: Any) -> None:
        self.api = api

    def call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.api, method)(*args)
        except HubError:
            raise SessionClosed(f"session {self.api.uid} is closed") from None

    def events(self, after: int, limit: int, wait: float) -> tuple[list[Any], bool]:
        return self.api.events(after, limit, wait)

    def unit_wire(self, desc: Any) -> dict[str, Any]:
        """A unit description as the hub takes it: client:// paths made absolute (they are
        relative to the application's cwd, and the hub shares this machine)."""
        d = desc.as_dict()
        for key, side in (("input_staging", "source"), ("output_staging", "target")):
            for directive in d[key]:
                if split_url(directive[side])[0] == "client":
                    directive[side] = "client://" + resolve_client_path(directive[side])
        return d

    def fetch_outputs(self, unit: Any) -> None:
        pass  # the hub shares this machine: outputs are in place already

    def close(self) -> None:
        pass


def read_access(spec: str) -> dict[str, Any]:
    """An access file (``address``, ``token``, ``user``) from a path or a JSON string."""
    text = spec
    if not spec.lstrip().startswith("{"):
        path = os.path.expanduser(spec)
        try:
            with open(path) as fh:
                text = fh.read()
        except OSError as exc:
            raise SessionError(f"hub: cannot read the access file {path}: "
                               f"{exc.strerror}") from None
    try:
        access = json.loads(text)
    except ValueError as exc:
        raise SessionError(f"hub: the access file {spec} is not JSON: {exc}") from None
    for key in ("address", "token", "user"):
        if not isinstance(access.get(key), str) or not access[key]:
            raise SessionError(f"hub: the access file {spec} has no {key!r}")
    return access


class Remote:
    """A hub service over zerorpc, from a thread of rpg's that runs the zerorpc clients."""

    remote = True

    def __init__(self, address: str, token: str, reconnect_timeout: float = RECONNECT_TIMEOUT,
                 on_close: Callable[[], None] | None = None) -> None:
        self.address = address
        self.token = token
        self.session = ""  # set once a session is opened or attached
        self.sandbox = ""  # the session's sandbox on the hub
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0
        self._on_close = on_close  # e.g. an SSH tunnel to stop after the clients
        self.log = get_logger("client", hub=address)
        self._loop: Any = None
        self._clients: dict[str, Any] = {}
        self._pending: set[Any] = set()  # greenlets of calls under way
        self._replies: set[Any] = set()  # replies callers wait for
        self._replies_lock = threads.Lock()
        self._ready = threads.Event()
        self._stop: Any = None
        from rpg.hub.hub import loop_thread_target

        self._thread = threads.Thread(loop_thread_target(self._main), "rpg-client")
        self._closed = False
        self._thread.start()
        self._ready.wait(30)

    def _main(self) -> None:
        self._loop = gevent.get_hub().loop
        self._stop = gevent.event.Event()
        self._ctx = zerorpc.Context()  # its own: zmq's threads end with this client
        self._ready.set()
        try:
            while not self._stop.wait(5.0):  # a timer keeps the loop alive (no LoopExit)
                pass
        finally:
            gevent.killall(list(self._pending), block=True, timeout=5)
            for c in self._clients.values():
                c.close()
            self._clients.clear()
            self._ctx.destroy(linger=0)

    def _client(self, lane: str) -> Any:
        c = self._clients.get(lane)
        if c is None:
            # A reply lost with a dropped connection is noticed by the timeout (zmq itself
            # reconnects under a new identity, so no heartbeat says so): a long poll waits
            # EVENTS_WAIT at most, so its lane times out soon after; then the call is made again.
            c = zerorpc.Client(context=self._ctx, timeout=CALL_TIMEOUT, heartbeat=3)
            no_zero_copy(c)
            no_linger(c)
            c.connect(self.address)
            self._clients[lane] = c
        return c

    def _drop(self, lane: str) -> None:
        c = self._clients.pop(lane, None)
        if c is not None:
            c.close()

    def _invoke(self, lane: str, method: str, args: tuple, longest: float) -> Any:
        """On the client loop: the call, made again on a new connection if this one drops;
        each attempt waits ``longest`` s at most (less once reconnect_timeout runs out)."""
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            timeout = max(min(longest, 10.0), min(longest, deadline - time.monotonic()))
            try:
                return self._client(lane)(method, *args, timeout=timeout)
            except zerorpc.RemoteError as exc:
                cls = _REMOTE_ERRORS.get(exc.name)
                if cls is None:
                    raise HubRefused(f"hub: {method} failed: {exc.name}: {exc.msg}") from None
                raise cls(exc.msg) from None
            except (zerorpc.LostRemote, zerorpc.TimeoutExpired) as exc:
                self._drop(lane)
                if time.monotonic() + delay > deadline:
                    raise HubUnreachable(f"hub {self.address} did not answer {method} for "
                                         f"{self.reconnect_timeout:.0f} s ({exc})") from None
                self.reconnects += 1
                self.log.warning("hub_connection_lost", call=method, error=str(exc)[:200],
                                 retry_in=round(delay, 2))
                gevent.sleep(delay)
                delay = min(2.0, delay * 2)

    def _run(self, lane: str, method: str, args: tuple, longest: float | None = None) -> Any:
        if longest is None:
            longest = EVENTS_WAIT + 8.0 if lane == "events" else CALL_TIMEOUT
        reply = threads.Reply()
        with self._replies_lock:  # close() answers every reply still registered
            if self._closed:
                raise SessionClosed(f"session {self.session}: the client is closed")
            self._replies.add(reply)

        def run() -> None:
            me = gevent.getcurrent()
            self._pending.add(me)
            try:
                reply.set(self._invoke(lane, method, args, longest))
            except gevent.GreenletExit:
                reply.set(error=SessionClosed(f"session {self.session}: the client closed "
                                              f"during {method}"))
            except BaseException as exc:
                reply.set(error=exc)
            finally:
                self._pending.discard(me)

        try:
            self._loop.run_callback_threadsafe(gevent.spawn, run)
            return reply.get(self.reconnect_timeout + 2 * longest, what=f"reply to {method}")
        finally:
            with self._replies_lock:
                self._replies.discard(reply)

    def hub_call(self, method: str, *args: Any) -> Any:
        """A call that names no session (hello, open_session, status, stop)."""
        return self._run("calls", method, (self.token, *args))

    def call(self, method: str, *args: Any) -> Any:
        if method == "close_session":  # waits for the close itself: its timeout and more
            return self._run("calls", method, (self.token, self.session, *args),
                             longest=float(args[0]) + CLOSE_MARGIN)
        if method in ("submit_pilots", "submit_units") and len(args[1]) > SUBMIT_SLICE:
            uids: list[str] = []  # the hub takes at most 20,000 a call: more go in slices
            try:
                for i in range(0, len(args[1]), SUBMIT_SLICE):
                    uids += self.call(method, args[0], args[1][i:i + SUBMIT_SLICE])
            except SessionError:
                if uids:  # all or nothing, as in one call: the slices taken are withdrawn
                    self.call("cancel_units" if method == "submit_units" else "cancel_pilots",
                              uids, None)
                raise
            return uids
        if method in ("new_manager", "submit_pilots", "submit_units"):
            args = (*args, secrets.token_hex(8))  # a retry gets the first reply
        return self._run("calls", method, (self.token, self.session, *args))

    def unit_wire(self, desc: Any) -> dict[str, Any]:
        """A unit description as the hub takes it: client:// inputs uploaded to the hub first
        (rpg/staging/relay.py), client:// outputs written there for ``fetch_outputs``."""
        d = desc.as_dict()
        for directive in d["input_staging"]:
            if split_url(directive["source"])[0] == "client":
                local = resolve_client_path(directive["source"])
                try:
                    directive["source"] = "client://" + relay.upload(self.call, local)
                except OSError as exc:  # before anything of this submit is accepted
                    raise DescriptionError(
                        "UnitDescription", "input_staging",
                        f"client://{local}: cannot read it here to send it to the hub: "
                        f"{exc.strerror or exc}") from None
        for directive in d["output_staging"]:
            if split_url(directive["target"])[0] == "client":
                local = resolve_client_path(directive["target"])
                directive["target"] = "client://" + os.path.join(
                    self.sandbox, "client", "out", relay.out_name(local))
        return d

    def fetch_outputs(self, unit: Any) -> None:
        """A DONE unit's client:// outputs, from the hub into place (before the application
        sees DONE). Only the client that submitted it knows where they go."""
        for directive in unit.description.output_staging:
            target = directive["target"]
            if split_url(target)[0] != "client":
                continue
            local = resolve_client_path(target)
            if local.startswith(os.path.join(self.sandbox, "client") + os.sep):
                continue  # an attached client: the description names the hub's copy
            try:
                relay.download(self.call, local,
                               create_parents="create_parents" in directive.get("flags", ()))
            except (OSError, SessionError, relay.RelayError) as exc:
                self.log.error("client_output_not_fetched", unit=unit.uid, path=local,
                               error=str(exc)[:300])

    def events(self, after: int, limit: int, wait: float) -> tuple[list[Any], bool]:
        reply = self._run("events", "events", (self.token, self.session, after, limit,
                                               min(wait, EVENTS_WAIT)))
        return reply["events"], reply["closed"]

    def close(self) -> None:
        with self._replies_lock:
            if self._closed:
                return
            self._closed = True
        if self._loop is not None:
            self._loop.run_callback_threadsafe(self._stop.set)
        self._thread.join(10)
        with self._replies_lock:  # a call whose greenlet never ran (or was killed)
            left, self._replies = list(self._replies), set()
        for reply in left:
            if not reply.ready():
                reply.set(error=SessionClosed(f"session {self.session}: the client closed"))
        if self._on_close is not None:
            self._on_close()


def connect(hub: str, reconnect_timeout: float = RECONNECT_TIMEOUT,
            ssh_key: str | None = None, known_hosts: str | None = None) -> Remote:
    """A Remote for ``hub``: an access file's path (or its JSON), or ``ssh://user@host/PATH``
    (the access file read over SFTP, the hub reached through an SSH tunnel to its loopback
    port). The token is checked at once (``hello``): a bad one fails here, clearly."""
    if not isinstance(hub, str) or not hub:
        raise SessionError(f"hub: expected the path of an access file or ssh://user@host/PATH,"
                           f" got {hub!r}")
    on_close = None
    if hub.startswith("ssh://"):
        from rpg.hub.launchers.ssh.forward import open_hub_tunnel

        tunnel = open_hub_tunnel(hub, key_file=ssh_key, known_hosts=known_hosts)
        access, on_close = tunnel.access, tunnel.close
    else:
        access = read_access(hub)
    t = Remote(access["address"], access["token"], reconnect_timeout, on_close)
    try:
        t.reconnect_timeout = min(reconnect_timeout, 10.0)  # a hub that is not there: say so
        hello = t.hub_call("hello")
        t.reconnect_timeout = reconnect_timeout
    except BaseException:
        t.close()
        raise
    if hello.get("protocol") != 1:
        t.close()
        raise SessionError(f"hub {access['address']} speaks protocol {hello.get('protocol')}, "
                           f"this client 1")
    t.dashboard = hello.get("dashboard")  # the service's dashboard page, if it has one
    return t
