"""One SSH connection per user@host, shared by every pilot of a hub that goes there (SSH pilots
and the SLURM cluster behind a login node): counted references, a reconnect that asks for every
pilot's remote forward port again, and one forward handler that hands each incoming channel to
the pilot whose port it arrived on (paramiko keeps a single handler per transport).

All methods but ``host_for`` block: lane threads only (the host's ``ssh:`` lane).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rpg import threads
from rpg.hub.launchers.base import LaunchError
from rpg.hub.launchers.ssh.connection import ConnectionLost, SSHConnection, net_errors
from rpg.hub.launchers.ssh.target import SSHTarget

if TYPE_CHECKING:
    import paramiko


def host_for(hub: Any, target: SSHTarget, desc: dict[str, Any], log: Any) -> SSHHost:
    """The hub's shared host for this target and these credentials (made on first use; cheap,
    no I/O: safe on the hub loop). Pilots with other keys or host-key policies get their own."""
    key = (target.label, desc.get("ssh_key_file"), desc.get("ssh_known_hosts"),
           bool(desc.get("ssh_trust_unknown_host")))
    hosts = hub.shared.setdefault("ssh_hosts", {})
    host = hosts.get(key)
    if host is None:
        host = hosts[key] = SSHHost(target, key[1], str(key[2]), key[3], log)
    return host


class SSHHost:
    """The connection to one user@host:port and the pilots using it."""

    def __init__(self, target: SSHTarget, key_file: str | None, known_hosts: str,
                 trust_unknown: bool, log: Any) -> None:
        self.target = target
        self.key_file = key_file
        self.known_hosts = known_hosts
        self.trust_unknown = trust_unknown
        self.log = log.bind(ssh=target.label)
        self.users = 0
        self.connects = 0  # connections opened (the first, then reconnects)
        self.conn: SSHConnection | None = None
        self.pinned_key: paramiko.PKey | None = None  # the key seen first: a reconnect wants it
        self.lost_ports: set[int] = set()  # forwards a reconnect could not get back
        self._forwards: dict[int, Callable[..., None]] = {}
        self._lock = threads.Lock()
        self._fresh = True  # the next connection is a first one (a failure: LaunchError)

    # -- references ------------------------------------------------------------------------------

    def acquire(self) -> SSHConnection:
        """One more user; the live connection (opened now if there is none)."""
        with self._lock:
            self.users += 1
        try:
            return self.live()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """One user fewer; the last one closes the connection."""
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            conn, self.conn = self.conn, None
            self._forwards.clear()
            self.lost_ports.clear()
            self._fresh = True
        if conn is not None:
            conn.close()
            self.log.info("ssh_connection_closed", connects=self.connects)

    # -- the connection --------------------------------------------------------------------------

    def live(self) -> SSHConnection:
        """The connection, reconnected if it dropped (every forward asked for again, on the
        same port; those refused go to ``lost_ports``). Raises LaunchError on the first
        connection, ConnectionLost on a reconnect."""
        conn = self.conn
        if conn is not None and conn.active():
            return conn
        with self._lock:
            if self.users <= 0:
                raise ConnectionLost(f"ssh {self.target.label}: no pilot uses this host")
            conn = self.conn
            if conn is not None and conn.active():
                return conn
            first = self._fresh  # no live user had this connection: not a reconnect
            if conn is not None:
                self.conn = None
                conn.close()
            fresh = SSHConnection(self.target.with_user(), self.key_file, self.known_hosts,
                                  self.trust_unknown, self.pinned_key, self.log)
            try:
                fresh.open()
            except LaunchError as exc:
                if first:
                    raise
                raise ConnectionLost(f"reconnect failed: {exc}") from None
            self.target = fresh.target
            self.pinned_key = fresh.pinned_key
            self.connects += 1
            self._fresh = False
            for port in list(self._forwards):
                try:
                    fresh.forward(port, self._dispatch)
                except ConnectionLost as exc:
                    self.lost_ports.add(port)
                    self.log.error("ssh_forward_port_lost", port=port, error=str(exc))
            self.conn = fresh
            if not first:
                self.log.warning("ssh_reconnected", connects=self.connects,
                                 users=self.users, lost_ports=sorted(self.lost_ports))
            return fresh

    def drop(self, conn: SSHConnection) -> None:
        """``conn`` stopped answering: close it (if it is still the current one); the next
        ``live`` reconnects."""
        with self._lock:
            if self.conn is conn:
                self.conn = None
        conn.close()

    # -- remote forwards -------------------------------------------------------------------------

    def forward(self, handler: Callable[..., None]) -> int:
        """A remote forward on the server's 127.0.0.1 (a free port) whose channels go to
        ``handler(chan, origin, server)``; returns the
        port."""
        conn = self.live()
        port = conn.forward(0, self._dispatch)
        with self._lock:
            self._forwards[port] = handler
        return port

    def unforward(self, port: int) -> None:
        """Stop forwarding ``port``: its channels are refused from now on, and the server is
        told without waiting for its answer (a frozen server must not hold a pilot's stop)."""
        with self._lock:
            self._forwards.pop(port, None)
            self.lost_ports.discard(port)
            conn = self.conn
        if conn is not None and conn.active() and conn.transport is not None:
            try:
                conn.transport.global_request("cancel-tcpip-forward", ("127.0.0.1", port),
                                              wait=False)
            except net_errors() as exc:
                self.log.warning("ssh_forward_cancel_failed", port=port, error=str(exc))

    def _dispatch(self, chan: Any, origin: Any, server: Any) -> None:
        """paramiko's forward handler (on the transport thread: must not block)."""
        handler = self._forwards.get(server[1]) if isinstance(server, tuple) else None
        if handler is None:
            chan.close()
            return
        handler(chan, origin, server)
