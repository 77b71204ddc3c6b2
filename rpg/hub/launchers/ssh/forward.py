"""A client's way to a hub service on another machine: ``ssh://[user@]host[:port]/PATH``.

The hub service binds 127.0.0.1 there and writes an access file. This reads the file over SFTP
and forwards a local 127.0.0.1 port to the hub's port through the SSH connection: each local
connection gets a ``direct-tcpip`` channel, the opposite direction of the pilots' reverse
tunnel, bridged by the same pump (``tunnel.TunnelPump``). The connection, authentication and
host-key policy are the SSH pilots' (``SSHConnection``). Every call blocks; the forward runs on
real threads (``rpg.threads``), whatever the application monkey-patched.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import stat
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from rpg import threads
from rpg.client import SessionError
from rpg.hub.launchers.base import LaunchError
from rpg.hub.launchers.ssh.connection import (
    WINDOW,
    ConnectionLost,
    SSHConnection,
    import_paramiko,
    net_errors,
)
from rpg.hub.launchers.ssh.target import SSHTarget
from rpg.hub.launchers.ssh.tunnel import TunnelPump
from rpg.log import SparseWarning, get_logger

if TYPE_CHECKING:
    import paramiko

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"  # as for SSH pilots (PilotDescription.ssh_known_hosts)
ACCESS_MAX = 64 * 1024  # an access file is a few hundred bytes
RECONNECT_EVERY_S = 2.0  # a dropped SSH connection is re-made on demand, not more often
# The loopback addresses a hub service may bind (rpg/hub/serve.py), and where each one is.
_LOOPBACK = re.compile(r"tcp://(127\.0\.0\.1|localhost|\[::1\]):([0-9]{1,5})")
_URL_SHAPE = "ssh://[user@]host[:port]/PATH (/~/PATH: relative to the remote home)"


def parse_hub_url(url: str) -> tuple[SSHTarget, str]:
    """(where to, the access file's remote path) of ``ssh://[user@]host[:port]/PATH``. A PATH
    that starts with ``/~/`` is relative to the remote home (as an SFTP path without a leading
    slash is). Blocking: without a user, the local one may come from the password database."""
    if not isinstance(url, str) or not url.startswith("ssh://"):
        raise SessionError(f"hub: expected {_URL_SHAPE}, got {url!r}")
    hostpart, slash, rest = url[len("ssh://"):].partition("/")
    path = slash + rest
    if path.startswith("/~/"):
        path = path[3:]
    if path in ("", "/", "/~") or path.endswith("/"):
        raise SessionError(f"hub {url}: no access file after the host; expected {_URL_SHAPE}")
    user, at, hostport = hostpart.rpartition("@")
    host, colon, port = hostport.partition(":")
    bad_port = colon and not (port.isdigit() and 0 < int(port) < 65536)
    if not host or (at and not user) or bad_port or any(c in host for c in "[]@"):
        raise SessionError(f"hub {url}: expected {_URL_SHAPE}")
    return SSHTarget.parse("ssh://" + hostpart).with_user(), path


def validate_access(url: str, raw: bytes) -> tuple[dict[str, Any], tuple[str, int]]:
    """The access file's content and the hub's (host, port) on the remote; SessionError
    naming the field."""
    try:
        access = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise SessionError(f"hub {url}: the access file is not JSON: {exc}") from None
    if not isinstance(access, dict):
        raise SessionError(f"hub {url}: the access file is not a JSON object")
    address = access.get("address")
    if not isinstance(address, str) or not address:
        raise SessionError(f"hub {url}: the access file has no 'address'")
    m = _LOOPBACK.fullmatch(address)
    if m is None or not 0 < int(m[2]) < 65536:
        raise SessionError(
            f"hub {url}: the access file's 'address' must be tcp://127.0.0.1:PORT (or localhost "
            f"or [::1]: a hub service binds loopback and is reached through SSH), "
            f"not {address!r}")
    for key in ("token", "user"):
        if not isinstance(access.get(key), str) or not access[key]:
            raise SessionError(f"hub {url}: the access file has no {key!r} (a non-empty string)")
    return access, ("::1" if m[1] == "[::1]" else "127.0.0.1", int(m[2]))


def _read_access_file(conn: SSHConnection, url: str, path: str, timeout: float,
                      log: Any) -> bytes:
    where = f"{path} on {conn.target.label}"
    try:
        with conn.sftp() as sftp:
            sftp.get_channel().settimeout(timeout)
            with sftp.open(path, "rb") as fh:
                st = fh.stat()
                if st.st_mode is not None and not stat.S_ISREG(st.st_mode):
                    raise SessionError(f"hub {url}: the access file {where} is not a file")
                if st.st_size is not None and st.st_size > ACCESS_MAX:
                    raise SessionError(f"hub {url}: the access file {where} is too big for "
                                       f"one ({st.st_size} bytes)")
                if st.st_mode is not None and st.st_mode & 0o077:
                    log.warning("hub_access_file_not_private", path=path,
                                mode=oct(stat.S_IMODE(st.st_mode)))
                return fh.read(ACCESS_MAX)
    except FileNotFoundError:
        raise SessionError(f"hub {url}: no access file {where} (is the hub service running? "
                           f"`rpg hub serve` writes it)") from None
    except PermissionError:
        raise SessionError(f"hub {url}: the access file {where} is not readable by "
                           f"{conn.target.user}") from None
    except ConnectionLost as exc:
        raise SessionError(f"hub {url}: {exc}") from None
    except TimeoutError:
        raise SessionError(f"hub {url}: reading the access file {where} took more than "
                           f"{timeout:g} s") from None
    except net_errors() as exc:
        raise SessionError(f"hub {url}: cannot read the access file {where}: "
                           f"{type(exc).__name__}: {exc}") from None


def _open_channel(transport: paramiko.Transport, hub: tuple[str, int], origin: tuple[str, int],
                  timeout: float) -> paramiko.Channel:
    """A direct-tcpip channel to ``hub`` (host, port) on the remote (paramiko's exceptions)."""
    return transport.open_channel("direct-tcpip", hub, origin,
                                  window_size=WINDOW, timeout=timeout)


def _probe(conn: SSHConnection, url: str, hub: tuple[str, int], timeout: float) -> None:
    """Is the hub there? One channel to its port, closed at once: a stale access file or a
    server that forbids forwarding fails here, clearly, not as a client that never connects."""
    pm = import_paramiko()
    where = f"{_host_port(hub)} on {conn.target.label}"
    assert conn.transport is not None
    try:
        _open_channel(conn.transport, hub, ("127.0.0.1", 0), timeout).close()
    except pm.ChannelException as exc:
        if exc.code == pm.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
            raise SessionError(f"hub {url}: the ssh server refuses to forward to {where} "
                               f"(sshd_config AllowTcpForwarding?): {exc.text}") from None
        raise SessionError(f"hub {url}: nothing answers at {where}, the access file's "
                           f"'address' (is the hub service running?): {exc.text}") from None
    except net_errors() as exc:
        raise SessionError(f"hub {url}: cannot open a channel to {where}: "
                           f"{type(exc).__name__}: {exc}") from None


class _ForwardPump(TunnelPump):
    """TunnelPump bridging the other way: its incoming channels are ones the tunnel opened for
    an accepted local connection, handed over with that connection."""

    def __init__(self, name: str, log: Any) -> None:
        super().__init__("127.0.0.1", 0, name, log)
        self._locals: dict[paramiko.Channel, socket.socket] = {}
        self._locals_lock = threads.Lock()

    def add(self, chan: paramiko.Channel, sock: socket.socket) -> None:
        with self._locals_lock:
            self._locals[chan] = sock
        self.accept(chan, None, None)

    def _connect_hub(self, chan: paramiko.Channel) -> socket.socket | None:
        with self._locals_lock:
            sock = self._locals.pop(chan, None)
        if sock is None:
            chan.close()
            return None
        return self._bridged(chan, sock)

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        with self._locals_lock:
            left, self._locals = list(self._locals.items()), {}
        for chan, sock in left:  # handed over but never picked up by the pump thread
            _close_all(chan, sock)


class HubTunnel:
    """A local 127.0.0.1 port forwarded to a hub service's port over SSH. ``access`` is the
    remote access file with ``address`` made the local end; ``close`` stops everything."""

    def __init__(self, url: str, conn: SSHConnection, hub: tuple[str, int],
                 access: dict[str, Any], log: Any, timeout: float = 10.0) -> None:
        self.url = url
        self.hub = hub  # (host, port) of the hub on the remote
        self.timeout = timeout  # opening the channel for one local connection
        self.log = log
        self._conn = conn
        self._lock = threads.Lock()
        self._closed = False
        self._last_reconnect = 0.0
        self._refused = SparseWarning(log, "hub_tunnel_channel_refused", burst=3, window=10.0)
        self._wake_r, self._wake_w = os.pipe()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._pump = _ForwardPump("rpg-hub-fwd", log)
        self._accepter = threads.Thread(self._accept_loop, "rpg-hub-accept")
        try:
            self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(64)
            self.local_port: int = self._listener.getsockname()[1]
            self._pump.start()
            self._accepter.start()
        except BaseException:
            self.close()
            raise
        self.access = {**access, "address": f"tcp://127.0.0.1:{self.local_port}"}

    def __enter__(self) -> HubTunnel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _accept_loop(self) -> None:
        try:
            while not self._closed:
                ready, _, _ = select.select([self._listener, self._wake_r], [], [])
                if self._closed:
                    return
                if self._listener in ready:
                    try:
                        sock, peer = self._listener.accept()
                    except OSError:  # the client gave up meanwhile (ECONNABORTED)
                        continue
                    try:
                        self._bridge(sock, peer)
                    except Exception as exc:  # this connection only; the next may do
                        _close_all(sock)
                        self.log.error("hub_tunnel_bridge_failed",
                                       error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            self.log.error("hub_tunnel_accept_failed", error=f"{type(exc).__name__}: {exc}")

    def _bridge(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """A channel for an accepted connection, handed to the pump; or the connection closed
        (the client, zmq, connects again by itself)."""
        try:
            chan = _open_channel(self._live_transport(), self.hub, peer[:2], self.timeout)
        except (LaunchError, ConnectionLost, *net_errors()) as exc:
            self._refused(error=f"{type(exc).__name__}: {exc}", hub=_host_port(self.hub))
            _close_all(sock)
            return
        if self._closed or self._pump.error is not None:
            _close_all(chan, sock)
            return
        self._pump.add(chan, sock)

    def _live_transport(self) -> paramiko.Transport:
        """The connection's transport, the connection made again (same host key) if it
        dropped; channels of the dead one have already read as closed in the pump."""
        conn = self._conn
        if conn.active():
            assert conn.transport is not None
            return conn.transport
        now = time.monotonic()
        if now - self._last_reconnect < RECONNECT_EVERY_S:
            raise ConnectionLost(f"ssh connection to {conn.target.label} is down")
        self._last_reconnect = now
        fresh = SSHConnection(conn.target, conn.key_file, conn.known_hosts, False,
                              conn.pinned_key, self.log)
        fresh.open()
        with self._lock:
            stale = self._closed
            if not stale:
                self._conn = fresh
        if stale:
            fresh.close()
            raise ConnectionLost("the hub tunnel is closing")
        conn.close()
        self.log.warning("hub_tunnel_reconnected", ssh=conn.target.label)
        assert fresh.transport is not None
        return fresh.transport

    def close(self) -> None:
        """Stop the listener and the pump, close every socket and channel and the SSH
        connection. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with suppress(OSError):
            os.write(self._wake_w, b"x")
        # A reconnect in progress on the accept thread takes up to three connect timeouts.
        accepter_done = self._accepter.join(40.0)
        self._listener.close()
        self._pump.close()
        with self._lock:
            conn = self._conn
        conn.close()
        if accepter_done:
            for fd in (self._wake_r, self._wake_w):
                with suppress(OSError):
                    os.close(fd)


def _host_port(hub: tuple[str, int]) -> str:
    host, port = hub
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _close_all(*things: Any) -> None:
    for thing in things:
        with suppress(*net_errors()):
            thing.close()


def _refuse_if_patched(url: str) -> None:
    """paramiko's transport thread, its channels' events and the connection's socket become
    gevent objects bound to one thread's loop once the application patched socket or
    threading, and the forward's threads then hang or fail; say so at once instead."""
    from gevent.monkey import is_module_patched

    patched = [m for m in ("socket", "threading") if is_module_patched(m)]
    if patched:
        raise SessionError(
            f"hub {url}: this application monkey-patched {' and '.join(patched)} with gevent, "
            f"and the SSH tunnel (paramiko, on real threads) cannot work then. Forward the port "
            f"outside it (ssh -N -L PORT:127.0.0.1:HUBPORT user@host) and pass the access "
            f"file's JSON with \"address\": \"tcp://127.0.0.1:PORT\" as hub=")


def open_hub_tunnel(url: str, key_file: str | None = None, known_hosts: str | None = None,
                    timeout: float = 10.0) -> HubTunnel:
    """Connect to ``ssh://[user@]host[:port]/PATH`` as SSH pilots do (``key_file``: else the
    user's keys and agent; ``known_hosts``: else ~/.ssh/known_hosts; an unknown host key is
    refused), read and check the access file at PATH, and forward a local port to the hub.
    ``timeout`` bounds the SFTP read and each channel to the hub; the SSH connection itself
    has connection.py's CONNECT_TIMEOUT for each of TCP connect, banner and authentication.
    Raises SessionError, naming the url and what is wrong."""
    target, path = parse_hub_url(url)
    _refuse_if_patched(url)
    log = get_logger("hub_tunnel", hub=url)
    conn = SSHConnection(target, key_file, known_hosts or DEFAULT_KNOWN_HOSTS, False, None, log)
    try:
        conn.open()
    except LaunchError as exc:
        raise SessionError(f"hub {url}: {exc}") from None
    try:
        access, hub = validate_access(url, _read_access_file(conn, url, path, timeout, log))
        _probe(conn, url, hub, timeout)
        tunnel = HubTunnel(url, conn, hub, access, log, timeout)
    except BaseException:
        conn.close()
        raise
    log.info("hub_tunnel_open", ssh=target.label, hub_on_remote=_host_port(hub),
             local=tunnel.access["address"])
    return tunnel
