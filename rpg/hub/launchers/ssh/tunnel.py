"""The reverse tunnel: every channel the remote port forward opens (the agent calling the hub)
is bridged to a new connection to the hub's socket, and one real thread pumps bytes both ways.
"""

from __future__ import annotations

import os
import socket
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from rpg import threads
from rpg.hub.launchers.ssh.connection import CHANNEL_TIMEOUT, CHUNK, net_errors

if TYPE_CHECKING:
    import paramiko


class TunnelPump:
    """Bridges every channel the remote forward opens to a new connection to the hub, and pumps
    bytes both ways on one thread (select over channels and sockets). It outlives reconnects:
    channels of a dead transport read as closed and their bridges end."""

    def __init__(self, hub_host: str, hub_port: int, name: str, log: Any) -> None:
        self.hub_host = hub_host
        self.hub_port = hub_port
        self.log = log
        self.bridged = 0
        self.error: str | None = None  # why the pump thread died, if it did
        self._incoming: threads.SimpleQueue[Any] = threads.SimpleQueue()  # real, as the pump
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop = False
        self._thread = threads.Thread(self._run, name)  # real, whatever was patched

    def start(self) -> None:
        self._thread.start()

    def accept(self, chan: paramiko.Channel, origin: Any, server: Any) -> None:
        """paramiko's forward handler; runs on the transport thread, so it must not block."""
        if self._stop:
            chan.close()
            return
        self._incoming.put(chan)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        # A real thread: its select must be the real one too (patched, it would wait on a
        # gevent hub of this thread's own, and the channels' events are on no hub).
        select = threads.original_module("select").select
        bridges: list[tuple[paramiko.Channel, socket.socket]] = []
        try:
            while not self._stop:
                while True:
                    try:
                        chan = self._incoming.get_nowait()
                    except threads.Empty:
                        break
                    sock = self._connect_hub(chan)
                    if sock is not None:
                        bridges.append((chan, sock))
                rlist: list[Any] = [self._wake_r]
                for chan, sock in bridges:
                    rlist += [chan, sock]
                ready, _, _ = select(rlist, [], [], 1.0)
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                for pair in list(bridges):
                    chan, sock = pair
                    if not self._pump(pair, ready):
                        bridges.remove(pair)
                        _close_bridge(chan, sock)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.log.error("ssh_tunnel_failed", error=self.error)
        finally:
            for chan, sock in bridges:
                _close_bridge(chan, sock)
            while True:
                try:
                    self._incoming.get_nowait().close()
                except threads.Empty:
                    break

    def _connect_hub(self, chan: paramiko.Channel) -> socket.socket | None:
        try:
            # real, as this thread (a patched one would be bound to a gevent hub of its own)
            sock = threads.original_module("socket").create_connection(
                (self.hub_host, self.hub_port), timeout=5.0)
        except OSError as exc:
            self.log.warning("ssh_tunnel_hub_unreachable", error=str(exc))
            chan.close()
            return None
        return self._bridged(chan, sock)

    def _bridged(self, chan: paramiko.Channel, sock: socket.socket) -> socket.socket:
        """A new bridge's two ends, with the timeouts a stalled peer must not outlast."""
        sock.settimeout(CHANNEL_TIMEOUT)
        chan.settimeout(CHANNEL_TIMEOUT)
        self.bridged += 1
        return sock

    @staticmethod
    def _pump(pair: tuple[paramiko.Channel, socket.socket], ready: list[Any]) -> bool:
        """Move what is ready; False when either side is closed or failed."""
        chan, sock = pair
        try:
            if chan in ready:
                data = chan.recv(CHUNK)
                if not data:
                    return False
                sock.sendall(data)
            if sock in ready:
                data = sock.recv(CHUNK)
                if not data:
                    return False
                chan.sendall(data)
        except net_errors():
            return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            fds = (self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = -1  # a late accept() writes to -1, not a reused fd
            for fd in fds:
                with suppress(OSError):
                    os.close(fd)


def _close_bridge(chan: paramiko.Channel, sock: socket.socket) -> None:
    for thing in (chan, sock):
        with suppress(*net_errors()):
            thing.close()

