"""The SSH launcher: the agent runs on another machine, reached with paramiko.

One SSH connection per pilot carries everything: the bootstrap (a remote sandbox, the rpg
package unpacked there, the agent started detached in its own session), a reverse port forward
through which the agent calls the hub (the hub keeps binding 127.0.0.1), the watch on the agent
(a short remote status script every few seconds), SFTP transfers for ``client://`` staging, and
the stop (SIGTERM, SIGKILL, a sweep for the pilot's unit processes, the sandbox removed).

Every paramiko call blocks, so all of them run on real threads: a control lane and a transfer
lane per host (``ssh:`` and ``sftp:`` + user@host:port), one paramiko transport thread per
connection and one tunnel thread per pilot that pumps bytes between forwarded channels and the
hub's socket. If the connection drops, the launcher reconnects and asks for the same remote
forward port again; the agent keeps its units running meanwhile (up to its heartbeat timeout).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import io
import os
import posixpath
import queue
import select
import shlex
import shutil
import socket
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event

from rpg.description import split_url
from rpg.hub.launchers.base import AGENT_TOKEN, Launcher, LaunchError

if TYPE_CHECKING:
    import paramiko

_RPG_PKG = os.path.dirname(os.path.abspath(__import__("rpg").__file__))

CONNECT_TIMEOUT = 10.0  # TCP connect, banner, auth: each
EXEC_TIMEOUT = 30.0  # one remote command
STATUS_TIMEOUT = 10.0  # the status check; past it the connection counts as dead
CHANNEL_TIMEOUT = 60.0  # a blocked read/write on an SFTP or tunnel channel
BOOTSTRAP_OP_TIMEOUT = 120.0  # the whole bootstrap, as one lane call
TRANSFER_TIMEOUT = 3600.0  # one staging directive
TERM_GRACE = 10.0  # SIGTERM -> SIGKILL for the agent (it cancels its units and pushes)
CHECK_EARLY_S = 0.5  # status checks while the agent has not called in yet
CHECK_MAX_S = 5.0
RECONNECT_EVERY_S = 2.0
CHUNK = 64 * 1024
READ_WINDOW = 4 * 1024 * 1024  # a get keeps at most this much in flight (128 reads of 32 KiB)
SFTP_CHUNK = 32 * 1024  # paramiko's SFTP request size
# AEAD first when the server has it: it moves bulk data faster than paramiko's ctr + hmac.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
WINDOW = 8 * 1024 * 1024  # SSH channel window: bulk SFTP needs more than paramiko's 2 MiB


def _pm() -> Any:
    """paramiko, imported on first use on a lane thread: importing it takes long enough to
    block the hub loop (launcher_for imports this module on the loop)."""
    import paramiko

    return paramiko


def _net_errors() -> tuple[type[BaseException], ...]:
    return (OSError, EOFError, _pm().SSHException)


class ConnectionLost(RuntimeError):
    """The SSH connection is down (and could not be re-established just now)."""


@dataclass(frozen=True)
class SSHTarget:
    user: str
    host: str
    port: int

    @classmethod
    def parse(cls, resource: str) -> SSHTarget:
        """``ssh://[user@]host[:port]`` (the description validated its shape). Without a user,
        the local one, from the environment: a password-database lookup could block the loop,
        so that fallback is left to ``with_user`` on a lane thread."""
        rest = resource[len("ssh://"):]
        user, _, hostport = rest.rpartition("@")
        host, _, port = hostport.partition(":")
        user = user or os.environ.get("LOGNAME") or os.environ.get("USER") or ""
        return cls(user, host, int(port) if port else 22)

    def with_user(self) -> SSHTarget:
        """This target with a user name for sure (blocking: may read the password database)."""
        return self if self.user else replace(self, user=getpass.getuser())

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _UnknownHostKey(Exception):
    pass


class _RejectUnknown:
    """The default: an unknown host key ends the connection, with a message saying what to do."""

    def __init__(self, known_hosts: str, missing_file: bool) -> None:
        self.known_hosts = known_hosts
        self.missing_file = missing_file

    def missing_host_key(self, client: Any, hostname: str, key: paramiko.PKey) -> None:
        where = (f"known_hosts file {self.known_hosts} does not exist" if self.missing_file
                 else f"it is not in {self.known_hosts}")
        raise _UnknownHostKey(
            f"unknown host key for {hostname} ({key.get_name()} {fingerprint(key)}): {where}; "
            f"refusing to connect. Add the key to known_hosts (ssh-keyscan) or set "
            f"ssh_trust_unknown_host=True to trust it for this pilot")


class _TrustUnknown:
    """The explicit opt-in: accept an unknown key for this pilot, log its fingerprint, and
    keep it in memory only (known_hosts is not written)."""

    def __init__(self, log: Any) -> None:
        self.log = log

    def missing_host_key(self, client: Any, hostname: str, key: paramiko.PKey) -> None:
        self.log.warning("ssh_unknown_host_key_trusted", host=hostname, key_type=key.get_name(),
                         fingerprint=fingerprint(key))
        client.get_host_keys().add(hostname, key.get_name(), key)


# -- one connection (blocking: lane threads only) ------------------------------------------------

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
        self._sftp_lock = threading.Lock()
        self._closed = False

    def open(self) -> None:
        """Connect and authenticate; raises LaunchError with a message a user can act on."""
        t = self.target
        pm = _pm()
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
                client.set_missing_host_key_policy(_RejectUnknown(known, missing))
            elif self.trust_unknown:
                client.set_missing_host_key_policy(_TrustUnknown(self.log))
            else:
                client.set_missing_host_key_policy(_RejectUnknown(known, missing))
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
        except _UnknownHostKey as exc:
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
        except _pm().SSHException as exc:
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
        except _net_errors() as exc:
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
                client = _pm().SFTPClient.from_transport(self._transport(), window_size=WINDOW)
            except _net_errors() as exc:
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
        except _pm().SSHException as exc:
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
            with suppress(*_net_errors()):
                client.close()
        for c in idle:
            with suppress(*_net_errors()):
                c.close()
        # Transport.close() does not wait for its thread; the thread notices within ~0.1 s.
        if transport is not None and transport.is_alive():
            transport.join(5.0)


# -- the tunnel: forwarded channels <-> the hub's socket (one real thread) ----------------------

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
        self._incoming: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

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
        bridges: list[tuple[paramiko.Channel, socket.socket]] = []
        try:
            while not self._stop:
                while True:
                    try:
                        chan = self._incoming.get_nowait()
                    except queue.Empty:
                        break
                    sock = self._connect_hub(chan)
                    if sock is not None:
                        bridges.append((chan, sock))
                rlist: list[Any] = [self._wake_r]
                for chan, sock in bridges:
                    rlist += [chan, sock]
                ready, _, _ = select.select(rlist, [], [], 1.0)
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
                except queue.Empty:
                    break

    def _connect_hub(self, chan: paramiko.Channel) -> socket.socket | None:
        try:
            sock = socket.create_connection((self.hub_host, self.hub_port), timeout=5.0)
        except OSError as exc:
            self.log.warning("ssh_tunnel_hub_unreachable", error=str(exc))
            chan.close()
            return None
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
        except _net_errors():
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
        with suppress(*_net_errors()):
            thing.close()


# -- remote scripts --------------------------------------------------------------------------------

# Start the agent as a session leader (os.setsid, then exec: the pid stays the agent's).
_DETACH = ("import os, sys; os.setsid(); "
           "os.execv(sys.executable, [sys.executable, '-m', 'rpg.agent'] + sys.argv[1:])")


def _alive_fn(pid: int, cfg_path: str) -> str:
    """sh function ``alive``: the agent's pid still runs the agent (not a zombie, not reused)."""
    q = shlex.quote
    return (
        "alive() {\n"
        f"  if [ ! -d /proc/self ]; then kill -0 {pid} 2>/dev/null; return; fi\n"
        f"  [ -r /proc/{pid}/cmdline ] || return 1\n"
        f"  tr '\\000' '\\n' < /proc/{pid}/cmdline 2>/dev/null | grep -qxF -- {q(cfg_path)}"
        " || return 1\n"
        f"  ! grep -q '^State:[[:space:]]*Z' /proc/{pid}/status 2>/dev/null\n"
        "}\n")


def _tail_lines(text: str, n: int = 5) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


# -- the launcher ---------------------------------------------------------------------------------

class SSHLauncher(Launcher):
    stages_client_files = True  # the agent is on another machine: the hub moves client:// files
    def __init__(self, hub: Any, pilot: Any) -> None:
        super().__init__(hub, pilot)
        d = pilot.desc
        self.target = SSHTarget.parse(d["resource"])
        self.log = hub.log.bind(pilot=pilot.uid, ssh=self.target.label)
        self.ctl = hub.pool.lane("ssh:" + self.target.label, threads=4, stall_after=60.0)
        self.xfer = hub.pool.lane("sftp:" + self.target.label, threads=4, stall_after=600.0)
        self.python = d["remote_python"]
        self.hb_timeout = float(d["heartbeat_timeout"])
        self.sandbox: str | None = None  # remote, canonical (pwd -P)
        self.agent_pid: int | None = None
        self.fwd_port = 0
        self.reconnects = 0
        self._conn: SSHConnection | None = None
        self._pinned_key: paramiko.PKey | None = None
        self._pump: TunnelPump | None = None
        self._op_lock = threading.Lock()  # bootstrap, teardown: one at a time
        self._conn_lock = threading.Lock()  # swapping the connection
        self._closing = False
        self._closed = False
        self._ended: str | None = None
        self._exit_code: int | None = None
        self._next_check = 0.0
        self._last_check = 0.0
        self._lost_since: float | None = None
        self._made_dirs: set[str] = set()
        self._launched = Event()  # set when launch() is over, whatever the outcome

    # -- hub-loop side ---------------------------------------------------------------------------

    def launch(self) -> None:
        try:
            self.ctl.run(self._b_bootstrap, timeout=BOOTSTRAP_OP_TIMEOUT)
        except LaunchError:
            raise
        except (ConnectionLost, TimeoutError) as exc:
            raise LaunchError(f"ssh bootstrap on {self.target.label}: {exc}") from None
        except Exception as exc:
            raise LaunchError(f"ssh bootstrap on {self.target.label} failed: "
                              f"{type(exc).__name__}: {exc}") from None
        finally:
            self._launched.set()
        self.pilot.sandbox = self.sandbox
        self._next_check = time.monotonic() + CHECK_EARLY_S
        self.log.info("agent_started", pid=self.agent_pid, sandbox=self.sandbox,
                      forward_port=self.fwd_port)

    def poll(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while self._ended is None:
            now = time.monotonic()
            if now >= self._next_check:
                # While the agent's calls arrive through the tunnel, a remote status check every
                # CHECK_MAX_S is plenty; when it goes quiet (or has not called in yet), look often.
                if not (self._heard_recently() and now - self._last_check < CHECK_MAX_S):
                    self._check()
                    self._last_check = time.monotonic()
                # While the connection is down, each check is a reconnect attempt: not too often.
                self._next_check = time.monotonic() + (
                    CHECK_EARLY_S if self._lost_since is None else RECONNECT_EVERY_S)
                continue
            left = deadline - now
            if left <= 0:
                return None
            gevent.sleep(min(left, self._next_check - now))
        return self._ended

    def _heard_recently(self) -> bool:
        p = self.pilot
        quiet = max(1.0, 2.0 * float(p.desc["heartbeat_interval"]))
        return p.registered.is_set() and time.time() - p.last_seen < quiet

    def _check(self) -> None:
        try:
            state, code, err = self.ctl.run(self._b_status, timeout=STATUS_TIMEOUT + 2 *
                                            CONNECT_TIMEOUT + 5)
        except Exception as exc:
            now = time.monotonic()
            if self._lost_since is None:
                self._lost_since = now
                self.log.warning("ssh_connection_lost", error=str(exc))
            lost = now - self._lost_since
            p = self.pilot
            silent = time.time() - p.last_seen if p.registered.is_set() else 0.0
            if max(lost, silent) > self.hb_timeout:  # the agent has given up on the hub by now
                self._ended = (f"ssh connection to {self.target.label} lost (agent silent for "
                               f"{silent:.0f} s) and not re-established: {exc}")
            return
        if self._lost_since is not None:
            self.log.warning("ssh_connection_restored",
                             after_s=round(time.monotonic() - self._lost_since, 2),
                             reconnects=self.reconnects)
            self._lost_since = None
        if state == "alive":
            if self._pump is not None and self._pump.error:
                self._ended = f"the ssh tunnel to the hub failed: {self._pump.error}"
            return
        tail = _tail_lines(err)
        if state == "exited":
            self._exit_code = code
            why = f"exit code {code}"
        elif state == "nosandbox":
            why = f"the remote pilot sandbox {self.sandbox} is gone"
        else:
            why = f"agent process {self.agent_pid} is gone without an exit code (killed?)"
        self._ended = why + (f"; stderr: {tail}" if tail else "")

    def ended_cleanly(self) -> bool:
        return self._exit_code == 0

    def stop(self, grace: float) -> None:
        self._closing = True
        self.ctl.run(self._b_teardown, grace, timeout=grace + TERM_GRACE + 2 * EXEC_TIMEOUT
                     + BOOTSTRAP_OP_TIMEOUT)

    # -- client:// staging (hub loop; the transfers run in the sftp lane) -----------------------

    def has_stage_in(self, desc: dict[str, Any]) -> bool:
        return any(_is_client(d["source"]) for d in desc.get("input_staging") or [])

    def has_stage_out(self, desc: dict[str, Any]) -> bool:
        return any(_is_client(d["target"]) for d in desc.get("output_staging") or [])

    def stage_in(self, unit: Any) -> None:
        for d in unit.desc["input_staging"]:
            if _is_client(d["source"]):
                self._transfer(unit, d, "in")

    def stage_out(self, unit: Any) -> None:
        for d in unit.desc["output_staging"]:
            if _is_client(d["target"]):
                self._transfer(unit, d, "out")

    def _transfer(self, unit: Any, d: dict[str, Any], direction: str) -> None:
        flags = d.get("flags") or []
        label = f"{d['action']} {d['source']} -> {d['target']}"
        # Units are bound while the pilot is still launching: wait for its sandbox, then
        # check again that there is one to stage into.
        self._launched.wait()
        try:
            if self.agent_pid is None or self._closing:
                raise ConnectionLost(f"pilot {self.pilot.uid} did not start or is stopping")
            if d["action"] == "link":
                raise ValueError("'link' cannot reach the application's machine from a remote "
                                 "pilot; use 'transfer' or 'copy'")
            unit_sb = posixpath.join(self.sandbox, unit.uid)
            nbytes, seconds = self._with_retry(self._b_transfer, d, direction, unit_sb)
        except Exception as exc:
            if "non_fatal" in flags:
                self.log.warning("staging_failed_non_fatal", unit=unit.uid, directive=label,
                                 error=str(exc))
                return
            raise RuntimeError(f"{label}: {exc}") from None
        self.hub.profile.add(time.time(), unit.uid, "TRANSFER", "hub", direction=direction,
                             bytes=nbytes, seconds=round(seconds, 6), source=d["source"],
                             target=d["target"], via="sftp")

    def _with_retry(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a transfer (idempotent); while the connection is down, try again after a
        reconnect, for as long as the agent waits for the hub (its heartbeat timeout)."""
        deadline = time.monotonic() + self.hb_timeout
        while True:
            try:
                return self.xfer.run(fn, *args, timeout=TRANSFER_TIMEOUT)
            except ConnectionLost as exc:
                if self._closing or time.monotonic() > deadline:
                    raise
                self.log.warning("ssh_transfer_retry", error=str(exc))
            gevent.sleep(1.0)

    # -- blocking side (lane threads) ---------------------------------------------------------

    def _abort_if_closing(self) -> None:
        if self._closing:
            raise LaunchError("pilot canceled during the ssh bootstrap")

    def _b_connect(self) -> SSHConnection:
        d = self.pilot.desc
        self.target = self.target.with_user()
        conn = SSHConnection(self.target, d["ssh_key_file"], d["ssh_known_hosts"],
                             bool(d["ssh_trust_unknown_host"]), self._pinned_key, self.log)
        conn.open()
        self._pinned_key = conn.pinned_key
        return conn

    def _b_live(self, closing_ok: bool = False, need_forward: bool = True) -> SSHConnection:
        """The connection, reconnected (same remote forward port) if it dropped. Without
        ``need_forward`` (the final cleanup), a reconnect that cannot get the port back will do."""
        conn = self._conn
        if conn is not None and conn.active():
            return conn
        with self._conn_lock:
            if self._closed or (self._closing and not closing_ok):
                raise ConnectionLost("the launcher is closing")
            conn = self._conn
            if conn is not None and conn.active():
                return conn
            if conn is not None:
                self._conn = None
                conn.close()
            try:
                conn = self._b_connect()
            except LaunchError as exc:
                raise ConnectionLost(f"reconnect failed: {exc}") from None
            if self.fwd_port and self._pump is not None:
                try:
                    conn.forward(self.fwd_port, self._pump.accept)
                except ConnectionLost as exc:
                    self.log.error("ssh_forward_port_lost", port=self.fwd_port, error=str(exc))
                    if need_forward:
                        conn.close()
                        raise ConnectionLost(
                            f"reconnected, but the remote port {self.fwd_port} the agent calls "
                            f"the hub on cannot be forwarded again: {exc}") from None
            self._conn = conn
            self.reconnects += 1
            self._made_dirs.clear()
            self.log.warning("ssh_reconnected", reconnects=self.reconnects)
            return conn

    def _b_bootstrap(self) -> None:
        with self._op_lock:
            self._abort_if_closing()
            conn = self._b_connect()
            self._conn = conn
            self._abort_if_closing()
            self._b_prepare(conn)
            self._abort_if_closing()
            host, _, port = self.hub.address[len("tcp://"):].rpartition(":")
            self._pump = TunnelPump(host, int(port), f"rpg-ssh-tunnel-{self.pilot.uid}",
                                    self.log)
            self._pump.start()
            self.fwd_port = conn.forward(0, self._pump.accept)
            self._b_upload(conn)
            self._abort_if_closing()
            self._b_start(conn)

    def _b_prepare(self, conn: SSHConnection) -> None:
        q = shlex.quote
        root = self.pilot.desc.get("sandbox")
        if root is None:
            root_expr = '"${HOME:-/tmp}"/rpg'
        elif root == "~" or root.startswith("~/"):
            root_expr = '"$HOME"' + (q(root[1:]) if len(root) > 1 else "")
        elif root.startswith("~"):
            raise LaunchError(f"sandbox {root!r}: only ~ and ~/path are understood")
        else:
            root_expr = q(root)
        script = (
            "umask 077\n"
            f"if ! command -v {q(self.python)} >/dev/null 2>&1; then\n"
            "  printf 'remote python %s not found on %s (PATH=%s)\\n' "
            f"{q(self.python)} \"$(hostname)\" \"$PATH\" >&2; exit 91\nfi\n"
            f"sb={root_expr}/{q(self.hub.session_uid)}/{q(self.pilot.uid)}\n"
            # A pre-existing sandbox must be a real directory of ours nobody else can write to
            # (anyone who can could plant links where the agent's files go).
            'if [ -L "$sb" ]; then printf \'pilot sandbox %s is a symbolic link: refusing it\\n\' '
            '"$sb" >&2; exit 93; fi\n'
            'mkdir -p -- "$sb" || exit 90\n'
            'cd -P -- "$sb" || exit 90\n'
            "set -- $(ls -ldn .)\n"
            'case "$1" in ?????w*|????????w*) printf \'pilot sandbox %s is writable by group or '
            "others (%s): refusing it\\n' \"$sb\" \"$1\" >&2; exit 93;; esac\n"
            'if [ "$3" != "$(id -u)" ]; then printf \'pilot sandbox %s is owned by uid %s, not '
            "by this user: refusing it\\n' \"$sb\" \"$3\" >&2; exit 93; fi\n"
            "pwd -P\n")
        rc, out, err = conn.run(script)
        if rc in (91, 93):
            raise LaunchError(f"ssh {self.target.label}: {_tail_lines(err)}")
        if rc != 0 or not out.strip().startswith("/"):
            raise LaunchError(f"ssh {self.target.label}: cannot create the remote pilot "
                              f"sandbox (exit {rc}): {_tail_lines(err) or out.strip()}")
        self.sandbox = out.strip().splitlines()[-1]

    def _b_upload(self, conn: SSHConnection) -> None:
        assert self.sandbox is not None
        sb = self.sandbox
        cfg = self.agent_config(f"tcp://127.0.0.1:{self.fwd_port}", sb)
        cfg.exit_code_file = posixpath.join(sb, "exit_code")
        tarball = _rpg_tarball()
        with conn.sftp() as sftp:
            sftp.putfo(io.BytesIO(tarball), posixpath.join(sb, "rpg.tar.gz"),
                       file_size=len(tarball))
            # Each agent file (the token in its own) created exclusively (O_CREAT|O_EXCL: never
            # through a planted link), owner-only before anything is written to it.
            for f in self.agent_files(cfg):
                path = posixpath.join(sb, f.name)
                with suppress(FileNotFoundError):
                    sftp.lstat(path)
                    raise LaunchError(f"ssh {self.target.label}: pilot sandbox {sb} already "
                                      f"holds {f.name}: refusing it")
                with sftp.open(path, "wx") as fh:
                    fh.chmod(f.mode)
                    fh.write(f.data)

    def _b_start(self, conn: SSHConnection) -> None:
        assert self.sandbox is not None
        q = shlex.quote
        sb = self.sandbox
        cfg_path = posixpath.join(sb, "agent.json")
        script = (
            f"cd -- {q(sb)} || exit 90\n"
            "mkdir -p lib && tar -xzf rpg.tar.gz -C lib && rm -f rpg.tar.gz || "
            "{ echo 'cannot unpack rpg in the pilot sandbox' >&2; exit 92; }\n"
            f"PYTHONPATH={q(sb + '/lib')}${{PYTHONPATH:+:$PYTHONPATH}}\n"
            # the agent carries its units' marker too: the final sweep finds it if all else fails
            f"RPG_PILOT_KEY={q(self.key)}\n"
            "export PYTHONPATH RPG_PILOT_KEY\n"
            f"{q(self.python)} -c {q(_DETACH)} --config {q(cfg_path)} "
            "> agent.out 2> agent.err < /dev/null &\n"
            "echo $!\n")
        rc, out, err = conn.run(script)
        pid = out.strip().splitlines()[-1] if out.strip() else ""
        if rc != 0 or not pid.isdigit():
            raise LaunchError(f"ssh {self.target.label}: cannot start the agent (exit {rc}): "
                              f"{_tail_lines(err) or out.strip()}")
        self.agent_pid = int(pid)

    def _b_status(self) -> tuple[str, int | None, str]:
        """("alive" | "exited" | "gone" | "nosandbox", exit code, agent.err tail)."""
        assert self.sandbox is not None and self.agent_pid is not None
        q = shlex.quote
        cfg_path = posixpath.join(self.sandbox, "agent.json")
        script = (
            _alive_fn(self.agent_pid, cfg_path)
            + f"cd -- {q(self.sandbox)} 2>/dev/null || {{ echo nosandbox; exit 0; }}\n"
            "if [ -s exit_code ]; then echo exited; cat exit_code; echo; "
            "tail -c 3000 agent.err >&2; exit 0; fi\n"
            "if alive; then echo alive; exit 0; fi\n"
            "sleep 0.3; if alive; then echo alive; exit 0; fi\n"  # be sure before saying gone
            # it may have written its exit code between the two checks
            "if [ -s exit_code ]; then echo exited; cat exit_code; echo; else echo gone; fi\n"
            "tail -c 3000 agent.err >&2\n")
        conn = self._b_live()
        try:
            rc, out, err = conn.run(script, timeout=STATUS_TIMEOUT)
        except (TimeoutError, ConnectionLost) as exc:
            # A connection that cannot open a channel and run `test` and `tail` in that time is
            # as good as dead (a silent network drop keeps the transport "active" for many
            # minutes): drop it, and the next call reconnects.
            conn.close()
            raise ConnectionLost(f"status check failed, connection dropped: {exc}") from None
        words = out.split()
        if rc != 0 or not words:
            raise ConnectionLost(f"status check failed (exit {rc}): {_tail_lines(err)}")
        code = int(words[1]) if words[0] == "exited" and len(words) > 1 and \
            words[1].lstrip("-").isdigit() else None
        return words[0], code, err

    def _b_teardown(self, grace: float) -> None:
        self._closing = True
        locked = self._op_lock.acquire(timeout=BOOTSTRAP_OP_TIMEOUT)
        try:
            if self.sandbox is not None:
                try:
                    try:
                        self._b_stop_remote(grace)
                    except (ConnectionLost, TimeoutError) as exc:
                        # The connection died or froze: once more on a fresh one.
                        self.log.warning("ssh_stop_retry", error=str(exc))
                        conn = self._conn
                        if conn is not None:
                            conn.close()
                        self._b_stop_remote(grace)
                except Exception as exc:
                    self.log.error("ssh_remote_cleanup_failed", sandbox=self.sandbox,
                                   error=f"{type(exc).__name__}: {exc}",
                                   note="the agent exits by itself after heartbeat_timeout")
        finally:
            self._b_close()
            if locked:
                self._op_lock.release()

    def _b_stop_remote(self, grace: float) -> None:
        assert self.sandbox is not None
        q = shlex.quote
        sb = self.sandbox
        keep = bool(self.pilot.desc.get("keep_sandbox"))
        parts = []
        if self.agent_pid is not None:
            ticks, term_ticks = max(1, int(grace * 5)), int(TERM_GRACE * 5)
            parts.append(
                _alive_fn(self.agent_pid, posixpath.join(sb, "agent.json"))
                + f"n=0; while alive && [ $n -lt {ticks} ]; do sleep 0.2; n=$((n+1)); done\n"
                f"if alive; then kill -TERM {self.agent_pid} 2>/dev/null; echo agent_terminated\n"
                f"  n=0; while alive && [ $n -lt {term_ticks} ]; do sleep 0.2; n=$((n+1)); done\n"
                "fi\n"
                f"if alive; then kill -KILL {self.agent_pid} 2>/dev/null; echo agent_killed; fi\n")
        # Units live in their own sessions: whatever is left of them (the agent died hard, or
        # never heard the end) carries RPG_PILOT_KEY; rpg.io_pool.sweep finds it in /proc.
        # A daemon that cleared its environment is still found by its cwd in the sandbox.
        sweep = ("import sys; from rpg.io_pool.sweep import kill_pilot_processes; "
                 "print(kill_pilot_processes(sys.argv[1], sys.argv[2]))")
        parts.append(
            f"echo swept $(PYTHONPATH={q(sb + '/lib')} {q(self.python)} -c {q(sweep)} "
            f"{q(self.key)} {q(sb)} 2>/dev/null)\n")
        if keep:  # the agent deletes its token file when it starts; one that never did
            parts.append(f"rm -f -- {q(posixpath.join(sb, AGENT_TOKEN))}\n")
        else:
            parts.append(f"rm -rf -- {q(sb)} && echo removed\n"
                         f"rmdir -- {q(posixpath.dirname(sb))} 2>/dev/null\n")
        parts.append("exit 0\n")
        conn = self._b_live(closing_ok=True, need_forward=False)
        _rc, out, _err = conn.run("".join(parts), timeout=grace + TERM_GRACE + EXEC_TIMEOUT)
        words = out.split()
        swept = words[words.index("swept") + 1] if "swept" in words and \
            words.index("swept") + 1 < len(words) else "?"
        self.log.info("ssh_pilot_stopped", terminated="agent_terminated" in words,
                      killed="agent_killed" in words, swept=swept,
                      sandbox_removed="removed" in words, reconnects=self.reconnects)
        if swept not in ("0", "?"):
            self.log.warning("orphan_unit_processes_killed", count=swept)

    def _b_close(self) -> None:
        with self._conn_lock:
            self._closed = True
            conn, self._conn = self._conn, None
        # No cancel_port_forward: it waits for the server's answer for as long as the transport
        # looks alive (forever, if the server froze). Closing the session ends the forward.
        if conn is not None:
            conn.close()  # first: its transport thread is the one that hands channels to the pump
        if self._pump is not None:
            self._pump.close()

    def _b_transfer(self, d: dict[str, Any], direction: str, unit_sb: str) -> tuple[int, float]:
        """(bytes, seconds) of one client:// directive, timed here (not in the lane queue)."""
        conn = self._b_live()
        t0 = time.perf_counter()
        try:
            return self._b_transfer_on(conn, d, direction, unit_sb), time.perf_counter() - t0
        except _net_errors() as exc:
            if conn.active():
                raise  # a real error (no such file, permission, ...)
            raise ConnectionLost(f"ssh connection dropped during the transfer: "
                                 f"{type(exc).__name__}: {exc}") from None

    def _b_transfer_on(self, conn: SSHConnection, d: dict[str, Any], direction: str,
                       unit_sb: str) -> int:
        flags = d.get("flags") or []
        if direction == "in":
            local = split_url(d["source"])[1]
            remote, root = self._remote_side(d["target"], unit_sb)
        else:
            local = split_url(d["target"])[1]
            remote, root = self._remote_side(d["source"], unit_sb)
        with conn.sftp() as sftp:
            self._makedirs(sftp, unit_sb)
            if direction == "in":
                parent = posixpath.dirname(remote)
                if "create_parents" in flags:
                    self._makedirs(sftp, parent)
                self._confined(sftp, parent, root, "staging target")
                _no_symlink_out(sftp, remote, root, self._confined)
                if os.path.isdir(local):
                    if "recursive" not in flags:
                        raise ValueError("source is a directory; add the 'recursive' flag")
                    n = _put_tree(sftp, local, remote)
                else:
                    n = _put_file(sftp, local, remote)
                if d["action"] == "move":
                    _remove_local(local)
                return n
            self._confined(sftp, remote, root, "staging source")
            if "create_parents" in flags:
                os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
            if stat.S_ISDIR(sftp.stat(remote).st_mode or 0):
                if "recursive" not in flags:
                    raise ValueError("source is a directory; add the 'recursive' flag")
                n = _get_tree(sftp, remote, local)
            else:
                n = _get_file(sftp, remote, local)
            if d["action"] == "move":
                _remove_remote(sftp, remote)
            return n

    def _remote_side(self, path: str, unit_sb: str) -> tuple[str, str]:
        """(remote absolute path, sandbox it must stay in) for the sandbox side of a directive."""
        assert self.sandbox is not None
        scheme, rel = split_url(path)
        if scheme == "pilot":
            return posixpath.normpath(posixpath.join(self.sandbox, rel)), self.sandbox
        return posixpath.normpath(posixpath.join(unit_sb, rel)), unit_sb

    def _makedirs(self, sftp: paramiko.SFTPClient, path: str) -> None:
        if path in self._made_dirs:
            return
        try:
            if stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                self._made_dirs.add(path)
                return
            raise ValueError(f"{path} exists and is not a directory")
        except FileNotFoundError:
            pass
        parent = posixpath.dirname(path)
        if parent != path:
            self._makedirs(sftp, parent)
        try:
            sftp.mkdir(path, 0o700)
        except OSError:
            if not stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                raise
        self._made_dirs.add(path)

    @staticmethod
    def _confined(sftp: paramiko.SFTPClient, path: str, root: str, what: str) -> None:
        """``path`` must resolve (symlinks too) inside ``root`` on the remote."""
        real, real_root = sftp.normalize(path), sftp.normalize(root)
        if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
            raise ValueError(f"{what} {path!r} escapes its sandbox (resolves to {real!r})")


def _is_client(path: str) -> bool:
    return split_url(path)[0] == "client"


def _no_symlink_out(sftp: paramiko.SFTPClient, remote: str, root: str,
                    confined: Callable[..., None]) -> None:
    """An existing target that is a symlink must not lead out of the sandbox."""
    try:
        st = sftp.lstat(remote)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode or 0):
        confined(sftp, remote, root, "staging target")


def _transport_preferring_fast_ciphers(sock: Any, **kw: Any) -> paramiko.Transport:
    transport = _pm().Transport(sock, **kw)
    opts = transport.get_security_options()
    offered = tuple(opts.ciphers)
    opts.ciphers = tuple(c for c in FAST_CIPHERS if c in offered) + tuple(
        c for c in offered if c not in FAST_CIPHERS)
    return transport


def _rpg_tarball() -> bytes:
    """The local rpg package (sources only) as a .tar.gz; a few hundred KB."""
    def skip_cache(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        base = posixpath.basename(info.name)
        if base == "__pycache__" or base.endswith((".pyc", ".pyo")):
            return None
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        tar.add(_RPG_PKG, arcname="rpg", filter=skip_cache)
    return buf.getvalue()


def _put_file(sftp: paramiko.SFTPClient, local: str, remote: str) -> int:
    # putfo streams in 32 KiB pipelined writes; confirm=True checks the remote size after.
    with open(local, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        sftp.putfo(fh, remote, file_size=size, confirm=True)
    return size


def _get_file(sftp: paramiko.SFTPClient, remote: str, local: str) -> int:
    # Pipelined reads, one window at a time: memory stays bounded (READ_WINDOW), and it is
    # faster than getfo(max_concurrent_prefetch_requests=...), whose limiter sleeps.
    total = 0
    with sftp.open(remote, "rb") as fr, open(local, "wb") as fh:
        size = fr.stat().st_size or 0
        while total < size:
            end = min(size, total + READ_WINDOW)
            chunks = [(o, min(SFTP_CHUNK, end - o)) for o in range(total, end, SFTP_CHUNK)]
            fh.writelines(fr.readv(chunks))
            total = end
        while True:  # the file grew since the stat: read the rest plainly
            data = fr.read(READ_WINDOW)
            if not data:
                break
            fh.write(data)
            total += len(data)
    return total


def _put_tree(sftp: paramiko.SFTPClient, local: str, remote: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(local):
        rel = os.path.relpath(dirpath, local)
        rdir = remote if rel == "." else posixpath.join(remote, *rel.split(os.sep))
        try:
            sftp.mkdir(rdir, 0o700)
        except OSError:
            if not stat.S_ISDIR(sftp.stat(rdir).st_mode or 0):
                raise
        for name in files:
            total += _put_file(sftp, os.path.join(dirpath, name), posixpath.join(rdir, name))
    return total


def _get_tree(sftp: paramiko.SFTPClient, remote: str, local: str) -> int:
    total = 0
    os.makedirs(local, exist_ok=True)
    for entry in sftp.listdir_attr(remote):
        r = posixpath.join(remote, entry.filename)
        loc = os.path.join(local, entry.filename)
        mode = entry.st_mode or 0
        if stat.S_ISDIR(mode):
            total += _get_tree(sftp, r, loc)
        elif stat.S_ISREG(mode):
            total += _get_file(sftp, r, loc)
    return total


def _remove_local(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _remove_remote(sftp: paramiko.SFTPClient, path: str) -> None:
    if stat.S_ISDIR(sftp.lstat(path).st_mode or 0):
        for entry in sftp.listdir_attr(path):
            _remove_remote(sftp, posixpath.join(path, entry.filename))
        sftp.rmdir(path)
    else:
        sftp.remove(path)
