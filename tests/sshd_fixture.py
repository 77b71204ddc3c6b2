"""Helpers for tests against the real OpenSSH server that ``.ci/sshd.sh start`` runs.

CI exports RPG_SSH_HOST, RPG_SSH_PORT, RPG_SSH_USER, RPG_SSH_KEY, RPG_SSH_KNOWN_HOSTS and
RPG_SSH_CONFIG (``eval "$(bash .ci/sshd.sh env)"``); without them the SSH tests skip. The
"remote" is this machine reached as root over SSH: the launcher only ever goes through SSH and
SFTP; these helpers may look at the remote directly (or through ``ssh``) to check what it left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from typing import Any

import psutil
import pytest

import rpg

ENV_KEYS = ("RPG_SSH_HOST", "RPG_SSH_PORT", "RPG_SSH_USER", "RPG_SSH_KEY", "RPG_SSH_KNOWN_HOSTS")

requires_sshd = pytest.mark.skipif(
    not os.environ.get("RPG_SSH_HOST"),
    reason="no test sshd: run `bash .ci/sshd.sh start` and `eval \"$(bash .ci/sshd.sh env)\"` "
           "(CI does this and exports RPG_SSH_HOST and friends)")


def ssh_env() -> dict[str, str]:
    missing = [k for k in ENV_KEYS if not os.environ.get(k)]
    if missing:
        pytest.skip(f"test sshd environment incomplete: {', '.join(missing)} not set")
    return {k: os.environ[k] for k in ENV_KEYS}


def resource(port: int | None = None) -> str:
    e = ssh_env()
    return f"ssh://{e['RPG_SSH_USER']}@{e['RPG_SSH_HOST']}:{port or e['RPG_SSH_PORT']}"


def pilot_desc(**kw: Any) -> rpg.PilotDescription:
    """An SSH pilot on the test sshd with its key and known_hosts; keywords override."""
    e = ssh_env()
    fields: dict[str, Any] = {
        "resource": resource(),
        "cores": 2,
        "runtime": 10.0,
        "ssh_key_file": e["RPG_SSH_KEY"],
        "ssh_known_hosts": e["RPG_SSH_KNOWN_HOSTS"],
        "heartbeat_interval": 0.5,
        "heartbeat_timeout": 20.0,
    }
    fields.update(kw)
    return rpg.PilotDescription(**fields)


def remote_sh(command: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run a command on the test sshd with the OpenSSH client (for checks, not for rpg)."""
    e = ssh_env()
    argv = ["ssh", "-F", "/dev/null", "-n", "-p", e["RPG_SSH_PORT"], "-i", e["RPG_SSH_KEY"],
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={e['RPG_SSH_KNOWN_HOSTS']}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            f"{e['RPG_SSH_USER']}@{e['RPG_SSH_HOST']}", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def free_port() -> int:
    """A local TCP port nobody listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pilot_leftovers(session_uid: str, pilot_uid: str, sandbox: str | None) -> list[str]:
    """Processes on the remote that still belong to the pilot: those with its marker
    ``RPG_PILOT_KEY=<session uid>/<pilot uid>`` (rpg.io_pool.sweep.pilot_processes; a bare
    RPG_PILOT_UID repeats across sessions, and other sessions may run on this host), and any
    agent whose command line names the pilot's sandbox."""
    from rpg.io_pool.sweep import pilot_key, pilot_processes

    key = pilot_key(session_uid, pilot_uid)
    found = [f"{pid} (RPG_PILOT_KEY={key}) {_cmdline(pid)}" for pid in pilot_processes(key)]
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "rpg.agent" in cmd and sandbox and sandbox in cmd:
            found.append(f"{p.info['pid']} agent: {cmd[:160]}")
    return found


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:160]
    except psutil.Error:
        return "(gone)"


def ssh_sessions_of_this_process(sshd_port: int) -> list[psutil.Process]:
    """The sshd processes serving this process's SSH connections to ``sshd_port``."""
    ours = set()
    for c in psutil.Process().net_connections(kind="tcp"):
        if c.raddr and c.raddr.port == sshd_port and c.status == psutil.CONN_ESTABLISHED:
            ours.add(c.laddr.port)
    found = []
    for p in psutil.process_iter(["pid", "name"]):
        if not (p.info["name"] or "").startswith("sshd"):
            continue
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.laddr and c.laddr.port == sshd_port and c.raddr and c.raddr.port in ours
               for c in conns):
            found.append(p)
    return found


def kill_ssh_sessions_of_this_process(sshd_port: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal the sshd processes serving this process's SSH connections (SIGKILL: the way a
    dropped network or a restarted sshd looks to the launcher; SIGSTOP: a connection that
    goes silent). Returns their pids."""
    done = []
    for p in ssh_sessions_of_this_process(sshd_port):
        try:
            os.kill(p.pid, sig)
            done.append(p.pid)
        except OSError:
            pass
    return done
