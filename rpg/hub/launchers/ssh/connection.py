"""One SSH connection (paramiko): connect and authenticate under the host-key policy, run remote
shell scripts, a pool of SFTP sessions, remote port forwards, and a close that cannot hang on a
peer that stopped answering. Every call blocks: lane threads only.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from rpg import threads
from rpg.hub.launchers.base import LaunchError
from rpg.hub.launchers.ssh.target import (
    RejectUnknown,
    SSHTarget,
    TrustUnknown,
    UnknownHostKey,
    fingerprint,
)

if TYPE_CHECKING:
    import paramiko

CONNECT_TIMEOUT = 10.0  # TCP connect, banner, auth: each
EXEC_TIMEOUT = 30.0  # one remote command
CHANNEL_TIMEOUT = 60.0  # a blocked read/write on an SFTP or tunnel channel
CHUNK = 64 * 1024
# AEAD first when the server has it: it moves bulk data faster than paramiko's ctr + hmac.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
WINDOW = 8 * 1024 * 1024  # SSH channel window: bulk SFTP needs more than paramiko's 2 MiB


def import_paramiko() -> Any:
    """paramiko, imported on first use on a lane thread: importing it takes long enough to
    block the hub loop (launcher_for imports this package on the loop)."""
    import paramiko

    if not _rebound and threads.application_patched():
        _paramiko_on_real_threads()
    return paramiko


_PARAMIKO_STDLIB = ("threading", "socket", "select", "time")
_rebound_lock = threads.Lock()
_rebound = False


def _paramiko_on_real_threads() -> None:
    """Make paramiko use real threads, locks, events, sockets and sleeps on rpg's threads,
    whatever the application monkey-patched.

    Patched, paramiko's transport thread becomes a greenlet on the hub of the lane thread that
    connected, and its Events, Conditions and sockets bind to that hub; the other lane threads,
    the tunnel pump and the transport's own sftp prefetch threads then use them across hubs
    (gevent's InvalidThreadUseError) or wait on a hub that never runs (a hang). paramiko looks
    ``threading.Lock``, ``socket.socket``... up in its modules at every call, so each module's
    ``threading``, ``socket``, ``select`` and ``time`` becomes a view that gives the originals
    (rpg.threads.original_module) on rpg's threads (rpg.threads.is_rpg_thread: its lanes, its
    own threads, and the transport threads started from them), and the patched ones on every
    other: the application's own paramiko, in its greenlets or its gevent thread pool, stays
    cooperative."""
    global _rebound
    with _rebound_lock:
        if _rebound:
            return
        views = {name: _OriginalsOnRpgThreads(sys.modules[name]) for name in
                 _PARAMIKO_STDLIB if name in sys.modules}
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not (mod_name == "paramiko" or mod_name.startswith("paramiko.")):
                continue
            for name, view in views.items():
                if mod.__dict__.get(name) is view.patched:
                    setattr(mod, name, view)
        _rebound = True


def on_application_thread() -> bool:
    """True on a thread that is not rpg's: the application's (its greenlets, its gevent
    objects); rpg's paramiko runs on rpg's threads only."""
    return not threads.is_rpg_thread()


class _OriginalsOnRpgThreads(types.ModuleType):
    """Stdlib module ``patched`` on the application's threads, its original on rpg's."""

    def __init__(self, patched: types.ModuleType) -> None:
        super().__init__(patched.__name__, patched.__doc__)
        self.patched = patched
        self.original = threads.original_module(patched.__name__)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.patched if on_application_thread() else self.original, name)


def net_errors() -> tuple[type[BaseException], ...]:
    """What paramiko raises when the network or the server fails."""
    return (OSError, EOFError, import_paramiko().SSHException)


class ConnectionLost(RuntimeError):
    """The SSH connection is down (and could not be re-established just now)."""


class SSHConnection:
    """One authenticated paramiko client, its remote commands and a pool of SFTP sessions."""

    def __init__(self, target: SSHTarget, key_file: str | None, known_hosts: str,
                 trust_unknown: bool, pinned_key: paramiko.PKey | None, log: Any) -> None:
        self.target = target
        self.key_file = key_file
        self.known_hosts = known_hosts
        self.trust_unknown = trust_unknown
        self.pinned_key = pinned_key
        self.log = log
        self.client: paramiko.SSHClient | None = None
        self.transport: paramiko.Transport | None = None
        self._sftp_idle: list[paramiko.SFTPClient] = []
        self._sftp_lock = threads.Lock()
        self._closed = False
        # Remote directories known to exist, for staging (rpg.staging.sftp.makedirs); a new
        # connection starts knowing none.
        self.known_dirs: set[str] = set()

    def open(self) -> None:
        """Connect and authenticate; raises LaunchError with a message a user can act on."""
        t = self.target
        pm = import_paramiko()
        client = pm.SSHClient()
        self.client = client
        try:
            known = os.path.expanduser(self.known_hosts)
            missing = not os.path.exists(known)
            if not missing:
                try:
                    client.load_system_host_keys(known)
                except OSError as exc:
                    raise LaunchError(f"cannot read known_hosts file {known}: {exc}") from None
            if self.pinned_key is not None:  # a reconnect: only the key we saw first will do
                client.get_host_keys().add(t.known_hosts_name, self.pinned_key.get_name(),
                                           self.pinned_key)
                client.set_missing_host_key_policy(RejectUnknown(known, missing))
            elif self.trust_unknown:
                client.set_missing_host_key_policy(TrustUnknown(self.log))
            else:
                client.set_missing_host_key_policy(RejectUnknown(known, missing))
            key_file = os.path.expanduser(self.key_file) if self.key_file else None
            client.connect(
                t.host, port=t.port, username=t.user, key_filename=key_file,
                look_for_keys=key_file is None, allow_agent=key_file is None,
                timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT,
                auth_timeout=CONNECT_TIMEOUT, channel_timeout=CONNECT_TIMEOUT,
                transport_factory=_transport_preferring_fast_ciphers)
        except LaunchError:
            self.close()
            raise
        except UnknownHostKey as exc:
            self.close()
            raise LaunchError(f"ssh {t.label}: {exc}") from None
        except pm.BadHostKeyException as exc:
            self.close()
            raise LaunchError(
                f"ssh {t.label}: host key mismatch: the server offered {exc.key.get_name()} "
                f"{fingerprint(exc.key)} but known_hosts has {fingerprint(exc.expected_key)}; "
                f"refusing to connect (the host was reinstalled, or someone is in the middle)"
            ) from None
        except pm.AuthenticationException as exc:
            self.close()
            how = f"key {self.key_file}" if self.key_file else "the default keys and ssh agent"
            raise LaunchError(f"ssh {t.label}: authentication failed with {how}: {exc}") from None
        except pm.ssh_exception.NoValidConnectionsError as exc:
            self.close()
            why = "; ".join(sorted({e.strerror or str(e) for e in exc.errors.values()}))
            raise LaunchError(f"ssh {t.label}: cannot connect: {why}") from None
        except socket.gaierror as exc:
            self.close()
            raise LaunchError(f"ssh {t.label}: cannot resolve {t.host}: {exc}") from None
        except TimeoutError:
            self.close()
            raise LaunchError(f"ssh {t.label}: connection timed out after "
                              f"{CONNECT_TIMEOUT:g} s") from None
        except (pm.SSHException, OSError, EOFError) as exc:
            self.close()
            raise LaunchError(f"ssh {t.label}: connection failed: "
                              f"{type(exc).__name__}: {exc}") from None
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(5)
        self.transport = transport
        if self.pinned_key is None:
            self.pinned_key = transport.get_remote_server_key()

    def active(self) -> bool:
        tr = self.transport
        return not self._closed and tr is not None and tr.is_active()

    def _transport(self) -> paramiko.Transport:
        tr = self.transport
        if self._closed or tr is None or not tr.is_active():
            raise ConnectionLost(f"ssh connection to {self.target.label} is down")
        return tr

    def run(self, script: str, timeout: float = EXEC_TIMEOUT) -> tuple[int, str, str]:
        """Run a POSIX sh script remotely (``/bin/sh -s``, whatever the login shell is).
        Returns (exit status, stdout, stderr); raises ConnectionLost or TimeoutError."""
        deadline = time.monotonic() + timeout
        try:
            chan = self._transport().open_session(timeout=min(timeout, CONNECT_TIMEOUT))
        except net_errors() as exc:  # EOFError too: the peer went before the transport saw it
            raise ConnectionLost(f"ssh {self.target.label}: cannot open a channel: {exc}") from None
        try:
            chan.settimeout(timeout)
            chan.exec_command("/bin/sh -s")
            chan.sendall(script.encode())
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            for buf, recv in ((out, chan.recv), (err, chan.recv_stderr)):
                while True:
                    chan.settimeout(max(0.01, deadline - time.monotonic()))
                    data = recv(CHUNK)
                    if not data:
                        break
                    if len(buf) < 1 << 20:
                        buf += data
            if not chan.status_event.wait(max(0.01, deadline - time.monotonic())):
                raise TimeoutError(f"remote command on {self.target.label} did not finish "
                                   f"within {timeout:g} s")
            return (chan.exit_status, out.decode("utf-8", "replace"),
                    err.decode("utf-8", "replace"))
        except TimeoutError:
            raise TimeoutError(f"remote command on {self.target.label} did not finish within "
                               f"{timeout:g} s") from None
        except net_errors() as exc:
            raise ConnectionLost(f"ssh {self.target.label}: {type(exc).__name__}: {exc}") from None
        finally:
            chan.close()

    @contextmanager
    def sftp(self) -> Iterator[paramiko.SFTPClient]:
        """An SFTP session for one thread at a time (paramiko's are not safe to share)."""
        with self._sftp_lock:
            client = self._sftp_idle.pop() if self._sftp_idle else None
        if client is None:
            try:
                client = import_paramiko().SFTPClient.from_transport(self._transport(),
                                                                     window_size=WINDOW)
            except net_errors() as exc:
                raise ConnectionLost(f"ssh {self.target.label}: cannot open SFTP: {exc}") from None
            assert client is not None
            client.get_channel().settimeout(CHANNEL_TIMEOUT)
        ok = False
        try:
            yield client
            ok = True
        finally:
            with self._sftp_lock:
                if ok and not self._closed:
                    self._sftp_idle.append(client)
                    client = None
            if client is not None:
                client.close()

    def forward(self, port: int, handler: Callable[..., None]) -> int:
        """Ask the server to listen on its 127.0.0.1:``port`` (0: any) and forward to us."""
        try:
            return self._transport().request_port_forward("127.0.0.1", port, handler=handler)
        except import_paramiko().SSHException as exc:
            hint = "" if port else " (does the server allow it? sshd_config AllowTcpForwarding)"
            raise ConnectionLost(f"ssh {self.target.label}: remote port forward to "
                                 f"127.0.0.1:{port or 'any'} refused: {exc}{hint}") from None

    def close(self) -> None:
        """Close the SFTP sessions, the client and its transport; join the transport thread."""
        self._closed = True
        with self._sftp_lock:
            idle, self._sftp_idle = self._sftp_idle, []
        client, self.client = self.client, None
        transport = client.get_transport() if client is not None else None
        # The transport first: it closes every channel without a word to the server, so nothing
        # here can block on a peer that stopped answering (closing an SFTP channel would send).
        if client is not None:
            with suppress(*net_errors()):
                client.close()
        for c in idle:
            with suppress(*net_errors()):
                c.close()
        # Transport.close() does not wait for its thread; the thread notices within ~0.1 s.
        if transport is not None and transport.is_alive():
            transport.join(5.0)


def _transport_preferring_fast_ciphers(sock: Any, **kw: Any) -> paramiko.Transport:
    pm = import_paramiko()
    real = threads.application_patched() and not on_application_thread()
    transport = (_real_thread_transport() if real else pm.Transport)(sock, **kw)
    opts = transport.get_security_options()
    offered = tuple(opts.ciphers)
    opts.ciphers = tuple(c for c in FAST_CIPHERS if c in offered) + tuple(
        c for c in offered if c not in FAST_CIPHERS)
    return transport


_real_transport: type | None = None


def _real_thread_transport() -> type:
    """paramiko.Transport on a real OS thread. Transport *is* a threading.Thread, and its base
    class is whatever ``threading.Thread`` was when paramiko was imported (a patched one starts
    a greenlet); its ``__init__`` calls ``threading.Thread.__init__``, the original one on
    rpg's threads (_paramiko_on_real_threads). The original Thread's other methods (start,
    join, is_alive...) go with it, ahead of the patched base class; Transport's own (run,
    __repr__...) stay."""
    global _real_transport
    if _real_transport is None:
        base = import_paramiko().Transport
        original = threads.original_module("threading").Thread
        skip = {"__dict__", "__weakref__", "__module__", "__qualname__", "__doc__"}
        _real_transport = type("Transport", (base,), {
            k: v for k, v in vars(original).items() if k not in skip and k not in vars(base)})
    return _real_transport
