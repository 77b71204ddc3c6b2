"""``slurm+ssh://user@login[:port]``: a SLURM cluster reached through its login node.

The SSH bootstrap (ssh/launcher.py) runs on the login node, over the host's one shared SSH
connection: the pilot sandbox (under ``PilotDescription.sandbox``, default ``~/rpg``, which
must be on a filesystem the compute nodes share, as a home directory is), the agent's python
environment (ssh/environment.py; its cache too must be shared), the rpg tarball unpacked, the
agent files and a batch script written over SFTP. Then the launcher runs ``sbatch`` there, and
the hub's ``SlurmCluster`` for this host follows every job of its pilots with one ``squeue``
over SSH per second; ``scancel`` goes the same way.

The agent on a compute node calls the hub: the hub's reverse forward listens on the login
node's 127.0.0.1, which the compute nodes cannot reach, so a small relay (ssh/relay.py, the
login node's python, detached) listens on ``PilotDescription.relay_address`` and passes each
connection on to the forward. ``auto`` (the default) is the address the login node's own name
resolves to; on the one-node CI cluster it is 127.0.0.1. Anything that reaches the relay reaches
the hub's agent port, which answers only calls carrying this pilot's token. Login nodes often
kill long-running user processes: while the job runs and the agent goes quiet, the launcher
checks the relay and starts it again on the same port (the agent's zerorpc reconnects).

Stop: the agent is let go for ``grace``, the job is scancel'ed and waited for, the relay is
stopped, unit processes left on the login node are swept (not those on other nodes: SLURM ends
the job's processes there), and the remote sandbox is removed. ``client://`` staging works as
for SSH pilots, through the shared connection.
"""

from __future__ import annotations

import posixpath
import shlex
import time
from typing import Any

from rpg.hub.launchers.base import AgentFile, LaunchError
from rpg.hub.launchers.slurm import (
    COMMAND_TIMEOUT,
    SlurmCluster,
    SlurmCommandError,
    SlurmJob,
    _tail_lines,
    batch_script,
    sbatch_options,
    stop_in_own_greenlet,
)
from rpg.hub.launchers.ssh import scripts
from rpg.hub.launchers.ssh.connection import CONNECT_TIMEOUT, EXEC_TIMEOUT, ConnectionLost
from rpg.hub.launchers.ssh.hosts import SSHHost
from rpg.hub.launchers.ssh.launcher import SSHLauncher
from rpg.io_pool import IOPoolError

SCRIPT = "agent.slurm"
RELAY_CHECK_S = 2.0  # at most this often, and only while the agent is quiet
# A login shell's PATH is what finds sbatch on most clusters: /etc/profile only if it is not
# on the plain one.
_FIND_SLURM = "command -v sbatch >/dev/null 2>&1 || . /etc/profile >/dev/null 2>&1\n"


def _b_slurm_command(host: SSHHost, argv: list[str], timeout: float) -> tuple[int, str, str]:
    """A SLURM command on the login node: (exit code, stdout, stderr). Blocking: the ssh lane."""
    try:
        conn = host.live()
    except (ConnectionLost, LaunchError) as exc:
        raise SlurmCommandError(f"{argv[0]} on {host.target.label}: {exc}") from None
    try:
        return conn.run(_FIND_SLURM + "exec " + shlex.join(argv) + "\n", timeout=timeout)
    except TimeoutError:
        raise SlurmCommandError(f"{argv[0]} on {host.target.label} did not finish within "
                                f"{timeout:g} s (slurmctld busy or unreachable?)",
                                timed_out=True) from None
    except ConnectionLost as exc:
        host.drop(conn)  # dead, though its transport may not know yet: the next call reconnects
        raise SlurmCommandError(f"{argv[0]} on {host.target.label}: {exc}") from None


def ssh_cluster(hub: Any, host: SSHHost, lane: Any) -> SlurmCluster:
    """The cluster behind this login host (one per shared SSH host), its commands in the
    host's control lane."""
    clusters = hub.shared.setdefault("slurm_clusters", {})
    key = ("ssh", id(host))
    cluster = clusters.get(key)
    if cluster is None:
        def run(argv: list[str], keep: Any = None) -> tuple[int, str, str]:
            return lane.run(_b_slurm_command, host, argv, COMMAND_TIMEOUT,
                            timeout=COMMAND_TIMEOUT + 2 * CONNECT_TIMEOUT + 10, keep=keep)

        cluster = clusters[key] = SlurmCluster(host.target.label, run, host.target.user,
                                               hub.log)
    return cluster


class SlurmSSHLauncher(SSHLauncher):
    """A pilot as a SLURM job submitted on a login node over SSH."""

    def __init__(self, hub: Any, pilot: Any) -> None:
        super().__init__(hub, pilot)
        self.relay_host = str(pilot.desc.get("relay_address") or "auto")
        self.relay: str | None = None  # host:port the agent calls
        self.job = SlurmJob(ssh_cluster(hub, self.host, self.ctl), pilot.uid,
                            f"rpg:{hub.session_uid}:{pilot.uid}")
        self._end_reason: str | None = None
        self._next_relay_check = 0.0
        self.relay_restarts = 0

    @property
    def job_id(self) -> str | None:
        return self.job.job_id

    # -- the bootstrap's steps that differ (lane threads) ----------------------------------------

    def _b_hub_address(self, conn: Any) -> str:
        assert self.sandbox is not None
        rc, out, err = conn.run(scripts.relay_start_script(self.sandbox, self.python,
                                                           self.relay_host, self.fwd_port))
        words = next((ln.split() for ln in out.splitlines() if ln.startswith("RELAY ")), [])
        if rc != 0 or len(words) != 3 or not words[2].isdigit():
            raise LaunchError(f"ssh {self.target.label}: the relay for the compute nodes did "
                              f"not start on {self.relay_host} (exit {rc}): {tail_of(err, out)}")
        self.relay = f"{words[1]}:{words[2]}"
        self.log.info("slurm_relay_started", relay=self.relay, forward_port=self.fwd_port)
        return f"tcp://{self.relay}"

    def _b_agent_files(self, cfg: Any) -> list[Any]:
        assert self.sandbox is not None
        cfg.resource_manager = "slurm"
        text = batch_script(self.pilot.uid, self.hub.session_uid, self.sandbox,
                            posixpath.join(self.sandbox, "lib"), self.python)
        return self.agent_files(cfg) + [AgentFile(SCRIPT, text.encode(), 0o700)]

    def _b_start(self, conn: Any) -> None:
        assert self.sandbox is not None
        rc, out, err = conn.run(scripts.unpack_script(self.sandbox))
        if rc != 0:
            raise LaunchError(f"ssh {self.target.label}: {tail_of(err, out)} (exit {rc})")

    def _b_stop_remote(self, grace: float) -> None:
        assert self.sandbox is not None
        conn = self._b_live(closing_ok=True, need_forward=False)
        _rc, out, _err = conn.run(scripts.relay_stop_script(self.sandbox), timeout=EXEC_TIMEOUT)
        if "relay_stopped" in out:
            self.log.info("slurm_relay_stopped", relay=self.relay)
        super()._b_stop_remote(0.0)  # no agent pid here: the sweep, and the sandbox removed

    # -- hub-loop side ---------------------------------------------------------------------------

    def launch(self) -> None:
        self._bootstrap()
        assert self.sandbox is not None
        argv = sbatch_options(self.pilot.desc, self.pilot.uid, self.sandbox,
                              self.job.comment) + [posixpath.join(self.sandbox, SCRIPT)]
        self.job.submit(argv, posixpath.join(self.sandbox, SCRIPT))
        self.log.info("slurm_ssh_pilot_submitted", job=self.job.job_id, sandbox=self.sandbox,
                      relay=self.relay)

    def queued(self) -> bool:
        return not self.pilot.registered.is_set() and self.job.queued()

    def poll(self, timeout: float) -> str | None:
        if self.job.job_id is None:
            return "the SLURM job was never submitted"
        deadline = time.monotonic() + timeout
        while not self.job.ended.is_set():
            if self._pump is not None and self._pump.error:
                return f"the ssh tunnel to the hub failed: {self._pump.error}"
            if self.fwd_port and self.fwd_port in self.host.lost_ports:
                return (f"ssh connection to {self.target.label} re-established, but the remote "
                        f"port {self.fwd_port} the relay passes the agent's calls to cannot be "
                        f"forwarded again")
            self._watch_relay()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.job.ended.wait(min(left, 1.0))
        if self._end_reason is None:
            try:
                tail = self.ctl.run(self._b_err_tail, timeout=EXEC_TIMEOUT + 2 * CONNECT_TIMEOUT)
            except (ConnectionLost, TimeoutError, IOPoolError, LaunchError) as exc:
                tail = f"(agent.err unreadable: {exc})"
            lines = _tail_lines(tail)
            self._end_reason = self.job.describe_end() + (
                f"; agent.err: {' | '.join(lines)}" if lines else "")
        return self._end_reason

    def _watch_relay(self) -> None:
        """Login nodes kill long-running user processes: while the job runs and the agent is
        quiet, make sure the relay still runs, and start it again on its port if not."""
        now = time.monotonic()
        if now < self._next_relay_check or self.job.rec.get("JobState") != "RUNNING" or \
                self._heard_recently():
            return
        self._next_relay_check = now + RELAY_CHECK_S
        try:
            restarted = self.ctl.run(self._b_relay_again, timeout=2 * EXEC_TIMEOUT
                                     + 2 * CONNECT_TIMEOUT)
        except Exception as exc:  # the connection is down: the next look tries again
            self.log.warning("slurm_relay_check_failed", relay=self.relay,
                             error=f"{type(exc).__name__}: {exc}")
            return
        if restarted:
            self.relay_restarts += 1
            self.log.warning("slurm_relay_restarted", relay=self.relay,
                             restarts=self.relay_restarts)

    def _b_relay_again(self) -> bool:
        """True if the relay was gone and runs again, on its port."""
        assert self.sandbox is not None and self.relay is not None
        conn = self._b_live()
        try:
            _rc, out, _err = conn.run(scripts.relay_alive_script(self.sandbox))
        except ConnectionLost:
            self.host.drop(conn)
            raise
        if "relay alive" in out:
            return False
        host, _, port = self.relay.rpartition(":")
        rc, out, err = conn.run(scripts.relay_start_script(self.sandbox, self.python, host,
                                                           self.fwd_port, int(port)))
        if rc != 0 or f"RELAY {host} {port}" not in out:
            raise LaunchError(f"the relay could not be started again on {self.relay} "
                              f"(exit {rc}): {tail_of(err, out)}")
        return True

    def _b_err_tail(self) -> str:
        assert self.sandbox is not None
        conn = self._b_live(closing_ok=True, need_forward=False)
        q = shlex.quote
        _rc, out, _err = conn.run(f"tail -c 4000 {q(posixpath.join(self.sandbox, 'agent.err'))}"
                                  " 2>/dev/null; exit 0\n")
        return out

    def ended_cleanly(self) -> bool:
        return self.job.ended_cleanly()

    def stop(self, grace: float) -> None:
        stop_in_own_greenlet(self._stop, grace)

    def _stop(self, grace: float) -> None:
        try:
            self.job.stop(grace, self.pilot.registered.is_set())
        finally:
            SSHLauncher.stop(self, 0.0)


def tail_of(err: str, out: str) -> str:
    return scripts.tail_lines(err) or out.strip()[-500:] or "no output"
