"""The SSH launcher: starts a pilot's agent on another machine, watches it, and stops it.

One SSH connection per user@host (hosts.py), shared by the hub's pilots there, carries
everything: the bootstrap (a remote sandbox, the python
the agent needs, checked or built once into an environment (environment.py), the rpg package
unpacked in the sandbox, the agent started detached in its own session), a reverse port forward
through which the agent calls the hub (the hub keeps binding 127.0.0.1), the watch on the agent
(a short remote status script every few seconds), the SFTP sessions the hub's ``client://``
staging uses (``rpg.staging.ClientStaging``; the launcher gives it the remote sandbox and the
connection, retried across reconnects), and the stop (SIGTERM, SIGKILL, a sweep for the pilot's
unit processes, the sandbox removed).

Every paramiko call blocks, so all of them run on real threads: a control lane and a transfer
lane per host (``ssh:`` and ``sftp:`` + user@host:port), one paramiko transport thread per
connection and one tunnel thread per pilot. If the connection drops, the launcher reconnects
and asks for the same remote forward port again; the agent keeps its units running meanwhile
(up to its heartbeat timeout). The last pilot on a host to stop closes its connection.
"""

from __future__ import annotations

import io
import os
import posixpath
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, TypeVar

import gevent
from gevent.event import Event

from rpg import threads
from rpg.hub.launchers.base import Launcher, LaunchError
from rpg.hub.launchers.ssh import environment, scripts
from rpg.hub.launchers.ssh.connection import (
    CONNECT_TIMEOUT,
    EXEC_TIMEOUT,
    ConnectionLost,
    SSHConnection,
    import_paramiko,
    net_errors,
)
from rpg.hub.launchers.ssh.hosts import host_for
from rpg.hub.launchers.ssh.scripts import tail_lines
from rpg.hub.launchers.ssh.target import SSHTarget
from rpg.hub.launchers.ssh.tunnel import TunnelPump
from rpg.staging import ClientStaging

T = TypeVar("T")

STATUS_TIMEOUT = 10.0  # the status check; past it the connection counts as dead
BOOTSTRAP_OP_TIMEOUT = 120.0  # the whole bootstrap, as one lane call
TRANSFER_TIMEOUT = 3600.0  # one staging directive
TERM_GRACE = 10.0  # SIGTERM -> SIGKILL for the agent (it cancels its units and pushes)
CHECK_EARLY_S = 0.5  # status checks while the agent has not called in yet
CHECK_MAX_S = 5.0
RECONNECT_EVERY_S = 2.0


class SSHLauncher(Launcher):
    """An agent on another machine, over one SSH connection; also the ``RemoteSandbox`` through
    which the hub's ``client://`` staging reaches the pilot sandbox there."""

    def __init__(self, hub: Any, pilot: Any) -> None:
        super().__init__(hub, pilot)
        d = pilot.desc
        self.target = SSHTarget.parse(d["resource"])
        self.log = hub.log.bind(pilot=pilot.uid, ssh=self.target.label)
        self.ctl = hub.pool.lane("ssh:" + self.target.label, threads=4, stall_after=60.0)
        # Bootstraps (an environment build, or the wait for another pilot's, may take many
        # minutes) have a lane of their own: they must never hold back the status checks,
        # stops and squeue calls of the pilots already running on the host.
        self.boot = hub.pool.lane("ssh-boot:" + self.target.label, threads=4,
                                  stall_after=environment.BUILD_TIMEOUT)
        self.xfer = hub.pool.lane("sftp:" + self.target.label, threads=4, stall_after=600.0)
        self.python = d["remote_python"]
        self.hb_timeout = float(d["heartbeat_timeout"])
        self.sandbox: str | None = None  # remote, canonical (pwd -P)
        self.agent_pid: int | None = None
        self.fwd_port = 0
        self.reconnects = 0
        self.host = host_for(hub, self.target, d, hub.log)
        self._acquired = False  # we are one of self.host's users
        self._pump: TunnelPump | None = None
        self._op_lock = threads.Lock()  # bootstrap, teardown: one at a time
        self._state_lock = threads.Lock()  # what _b_close gives back, vs the bootstrap
        self._closing = False
        self._closed = False
        self._ended: str | None = None
        self._exit_code: int | None = None
        self._next_check = 0.0
        self._last_check = 0.0
        self._lost_since: float | None = None
        self._launched = Event()  # set when launch() is over, whatever the outcome
        self._started = False  # the bootstrap went through (the agent started or was submitted)
        # The agent cannot reach the application's machine: the hub moves client:// files.
        self.client_staging = ClientStaging(self, hub.profile, self.log)

    # -- hub-loop side ---------------------------------------------------------------------------

    def launch(self) -> None:
        self._bootstrap()
        self._next_check = time.monotonic() + CHECK_EARLY_S
        self.log.info("agent_started", pid=self.agent_pid, sandbox=self.sandbox,
                      forward_port=self.fwd_port)

    def _bootstrap(self) -> None:
        """The whole bootstrap, in the host's control lane; LaunchError says what failed."""
        try:
            self.boot.run(self._b_bootstrap,
                         timeout=BOOTSTRAP_OP_TIMEOUT + environment.BUILD_TIMEOUT + 60)
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
            # An agent that calls in is alive, whatever our status checks meet: only its
            # silence counts once it has registered (it gives up on the hub after as long).
            silent = time.time() - p.last_seen if p.registered.is_set() else 0.0
            if (silent if p.registered.is_set() else lost) > self.hb_timeout:
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
        tail = tail_lines(err)
        if state == "exited":
            self._exit_code = code
            why = f"exit code {code}"
        elif state == "nosandbox":
            why = f"the remote pilot sandbox {self.sandbox} is gone"
        else:
            why = (f"agent process {self.agent_pid} is gone without an exit code: a signal "
                   f"ended it (a kill -9, the OOM killer)")
        self._ended = why + (f"; stderr: {tail}" if tail else "")

    def ended_cleanly(self) -> bool:
        return self._exit_code == 0

    def stop(self, grace: float) -> None:
        self._closing = True
        self.ctl.run(self._b_teardown, grace, timeout=grace + TERM_GRACE + 2 * EXEC_TIMEOUT
                     + BOOTSTRAP_OP_TIMEOUT)

    # -- the remote sandbox, for client:// staging (rpg.staging.RemoteSandbox) ----------------

    def pilot_sandbox(self) -> str:
        """The remote pilot sandbox once the launch is over (waits for it)."""
        self._launched.wait()
        if self.sandbox is None or not self._started or self._closing:
            raise ConnectionLost(f"pilot {self.pilot.uid} did not start or is stopping")
        return self.sandbox

    def sftp_call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(sftp, known_dirs, *args)`` in the sftp lane (``fn`` is idempotent); while the
        connection is down, again after a reconnect, for as long as the agent waits for the hub
        (its heartbeat timeout)."""
        deadline = time.monotonic() + self.hb_timeout
        while True:
            try:
                return self.xfer.run(self._b_sftp_call, fn, args, timeout=TRANSFER_TIMEOUT)
            except ConnectionLost as exc:
                if self._closing or time.monotonic() > deadline:
                    raise
                self.log.warning("ssh_transfer_retry", error=str(exc))
            gevent.sleep(1.0)

    # -- blocking side (lane threads) ---------------------------------------------------------

    def _abort_if_closing(self) -> None:
        if self._closing:
            raise LaunchError("pilot canceled during the ssh bootstrap")

    def _b_live(self, closing_ok: bool = False, need_forward: bool = True) -> SSHConnection:
        """The host's connection, reconnected if it dropped. Without ``need_forward`` (the final
        cleanup), a reconnect that could not get our remote forward port back will do."""
        if self._closed or (self._closing and not closing_ok) or not self._acquired:
            raise ConnectionLost("the launcher is closing")
        before = self.host.connects
        conn = self.host.live()
        if self.host.connects != before:
            self.reconnects += 1
        if need_forward and self.fwd_port and self.fwd_port in self.host.lost_ports:
            raise ConnectionLost(f"reconnected, but the remote port {self.fwd_port} the agent "
                                 f"calls the hub on cannot be forwarded again")
        return conn

    def _b_bootstrap(self) -> None:
        with self._op_lock:
            self._abort_if_closing()
            # A teardown that gave up waiting for this bootstrap may close meanwhile: each
            # thing that close undoes is taken under _state_lock, and given back at once if
            # the close came first.
            conn = self.host.acquire()
            with self._state_lock:
                if self._closed:
                    self.host.release()
                    raise LaunchError("pilot canceled during the ssh bootstrap")
                self._acquired = True
            self._b_prepare(conn)
            self._abort_if_closing()
            self._b_environment(conn)
            self._abort_if_closing()
            host, _, port = self.hub.address[len("tcp://"):].rpartition(":")
            with self._state_lock:
                self._abort_if_closed()
                self._pump = TunnelPump(host, int(port), f"rpg-ssh-tunnel-{self.pilot.uid}",
                                        self.log)
                self._pump.start()
            fwd_port = self.host.forward(self._pump.accept)
            with self._state_lock:
                if self._closed:
                    self.host.unforward(fwd_port)
                    raise LaunchError("pilot canceled during the ssh bootstrap")
                self.fwd_port = fwd_port
            self._b_upload(conn, self._b_hub_address(conn))
            self._abort_if_closing()
            self._b_start(conn)
            self._started = True

    def _b_hub_address(self, conn: SSHConnection) -> str:
        """Where the agent calls the hub: the remote forward, on the remote's loopback."""
        return f"tcp://127.0.0.1:{self.fwd_port}"

    def _b_agent_files(self, cfg: Any) -> list[Any]:
        """What goes into the remote sandbox next to the rpg tarball."""
        cfg.exit_code_file = posixpath.join(cfg.sandbox, scripts.EXIT_CODE)
        return self.agent_files(cfg)

    def _b_prepare(self, conn: SSHConnection) -> None:
        script = scripts.sandbox_script(self.python, self.pilot.desc.get("sandbox"),
                                        self.hub.session_uid, self.pilot.uid)
        rc, out, err = conn.run(script)
        if rc in (scripts.NO_PYTHON, scripts.BAD_SANDBOX):
            raise LaunchError(f"ssh {self.target.label}: {tail_lines(err)}")
        if rc != 0 or not out.strip().startswith("/"):
            raise LaunchError(f"ssh {self.target.label}: cannot create the remote pilot "
                              f"sandbox (exit {rc}): {tail_lines(err) or out.strip()}")
        self.sandbox = out.strip().splitlines()[-1]

    def _b_environment(self, conn: SSHConnection) -> None:
        """The python the agent runs on: ``remote_python``, or an environment built for it."""
        d = self.pilot.desc
        mode = d.get("remote_env") or "create"
        if mode == "none":
            return
        assert self.sandbox is not None
        local_wheels = d.get("remote_env_wheels")
        wheels = posixpath.join(self.sandbox, "wheels") if local_wheels else None
        cache = d.get("remote_env_cache") or "~/.cache/rpg"
        t0 = time.monotonic()
        for _ in range(2):
            script = environment.bootstrap_script(self.python, mode, cache, wheels)
            rc, out, err = conn.run(script, timeout=environment.BUILD_TIMEOUT + 60)
            if rc != environment.NEED_WHEELS:
                break
            self._b_upload_wheels(conn, str(local_wheels), str(wheels))
        python, what = environment.parse(out)
        if rc == environment.ENV_FAILED:
            raise LaunchError(f"ssh {self.target.label}: {err.strip()[-3000:]}")
        if rc != 0 or not python:
            said = tail_lines(err, 12) or tail_lines(out, 5) or (
                "it printed nothing: is it a Python 3.8 or newer?")
            raise LaunchError(f"ssh {self.target.label}: the environment bootstrap on "
                              f"{self.python} failed (exit {rc}): {said}")
        self.log.info("remote_env_ready", python=python, how=what,
                      seconds=round(time.monotonic() - t0, 3))
        self.python = python

    def _b_upload_wheels(self, conn: SSHConnection, local: str, remote: str) -> None:
        local = os.path.expanduser(local)
        try:
            names = sorted(n for n in os.listdir(local) if n.endswith(".whl"))
        except OSError as exc:
            raise LaunchError(f"remote_env_wheels {local}: {exc.strerror}") from None
        if not names:
            raise LaunchError(f"remote_env_wheels {local}: no .whl files there")
        with conn.sftp() as sftp:
            sftp.mkdir(remote, 0o700)
            for n in names:
                sftp.put(os.path.join(local, n), posixpath.join(remote, n))
        self.log.info("remote_env_wheels_uploaded", count=len(names), to=remote)

    def _b_upload(self, conn: SSHConnection, hub_address: str) -> None:
        assert self.sandbox is not None
        sb = self.sandbox
        files = self._b_agent_files(self.agent_config(hub_address, sb))
        tarball = scripts.rpg_tarball()
        with conn.sftp() as sftp:
            sftp.putfo(io.BytesIO(tarball), posixpath.join(sb, "rpg.tar.gz"),
                       file_size=len(tarball))
            # Each agent file (the token in its own) created exclusively (O_CREAT|O_EXCL: never
            # through a planted link), owner-only before anything is written to it.
            for f in files:
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
        script = scripts.start_script(self.sandbox, self.python, self.key)
        rc, out, err = conn.run(script)
        pid = out.strip().splitlines()[-1] if out.strip() else ""
        if rc != 0 or not pid.isdigit():
            raise LaunchError(f"ssh {self.target.label}: cannot start the agent (exit {rc}): "
                              f"{tail_lines(err) or out.strip()}")
        self.agent_pid = int(pid)

    def _b_status(self) -> tuple[str, int | None, str]:
        """("alive" | "exited" | "gone" | "nosandbox", exit code, agent.err tail)."""
        assert self.sandbox is not None and self.agent_pid is not None
        script = scripts.status_script(self.sandbox, self.agent_pid)
        conn = self._b_live()
        try:
            rc, out, err = conn.run(script, timeout=STATUS_TIMEOUT)
        except (TimeoutError, ConnectionLost) as exc:
            # A connection that cannot open a channel and run `test` and `tail` in that time is
            # as good as dead (a silent network drop keeps the transport "active" for many
            # minutes): drop it, and the next call reconnects.
            self.host.drop(conn)
            raise ConnectionLost(f"status check failed, connection dropped: {exc}") from None
        words = out.split()
        if rc != 0 or not words:
            raise ConnectionLost(f"status check failed (exit {rc}): {tail_lines(err)}")
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
                        conn = self.host.conn
                        if conn is not None:
                            self.host.drop(conn)
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
        script = scripts.stop_script(self.sandbox, self.agent_pid, grace, TERM_GRACE,
                                     self.python, self.key,
                                     bool(self.pilot.desc.get("keep_sandbox")))
        conn = self._b_live(closing_ok=True, need_forward=False)
        _rc, out, _err = conn.run(script, timeout=grace + TERM_GRACE + EXEC_TIMEOUT)
        words = out.split()
        i = words.index("swept") + 1 if "swept" in words else len(words)
        # no number: the sweep could not run there (a python without rpg's packages)
        swept = words[i] if i < len(words) and words[i].isdigit() else "?"
        self.log.info("ssh_pilot_stopped", terminated="agent_terminated" in words,
                      killed="agent_killed" in words, swept=swept,
                      sandbox_removed="removed" in words, reconnects=self.reconnects)
        if swept not in ("0", "?"):
            self.log.warning("orphan_unit_processes_killed", count=swept)

    def _abort_if_closed(self) -> None:
        if self._closed:
            raise LaunchError("pilot canceled during the ssh bootstrap")

    def _b_close(self) -> None:
        """Give back what the bootstrap took (once; a second call does nothing)."""
        with self._state_lock:
            self._closed = True
            acquired, self._acquired = self._acquired, False
            pump = self._pump
        if acquired:  # the forward, too, is given back once
            port = self.fwd_port
            if port:
                self.host.unforward(port)  # its channels are refused from now on
            self.host.release()  # the last user closes the connection
        if pump is not None:
            pump.close()

    def _b_sftp_call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._b_live()
        try:
            with conn.sftp() as sftp:
                return fn(sftp, conn.known_dirs, *args)
        except net_errors() as exc:
            # A channel that hit EOF says so (EOFError, paramiko's "Server connection dropped")
            # before the transport thread notices, while the connection still looks active.
            if conn.active() and not isinstance(exc, (EOFError, import_paramiko().SSHException)):
                raise  # a real error (no such file, permission, ...)
            raise ConnectionLost(f"ssh connection dropped during the transfer: "
                                 f"{type(exc).__name__}: {exc}") from None
