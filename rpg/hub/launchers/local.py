"""The local launcher: the agent is a child process of the application, on this machine."""

from __future__ import annotations

import os
import sys

from rpg.hub.launchers.base import (
    AGENT_CONFIG,
    AgentFile,
    Launcher,
    LaunchError,
    expand_sandbox,
    prepare_sandbox,
)
from rpg.io_pool import Child, IOPoolError, SpawnError, spawn
from rpg.io_pool.sweep import kill_pilot_processes
from rpg.io_pool.tails import read_tail
from rpg.launch_config import AgentConfig

_RPG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__import__("rpg").__file__)))


def local_sandbox_path(launcher: Launcher) -> str:
    """The pilot's sandbox with ``~`` expanded (``pilot.sandbox`` becomes it). Hub loop."""
    pilot = launcher.pilot
    if pilot.sandbox.startswith("~"):
        pilot.sandbox = launcher.hub.pool.spawn.run(expand_sandbox, pilot.sandbox, timeout=30)
    return pilot.sandbox


def make_local_sandbox(launcher: Launcher, sandbox: str, cfg: AgentConfig,
                       extra: list[AgentFile] | None = None) -> None:
    """Create the pilot sandbox and write agent.json, agent.token, empty agent.out and
    agent.err (plain files of ours, not links) and ``extra`` into it. Hub loop (the disk work
    runs in the sandbox's lane); raises LaunchError. For the local and SLURM launchers."""
    files = launcher.agent_files(cfg) + [AgentFile("agent.out", b""),
                                         AgentFile("agent.err", b"")] + list(extra or [])
    try:
        launcher.hub.pool.for_path(sandbox).run(prepare_sandbox, sandbox, files, timeout=30)
    except (OSError, IOPoolError) as exc:
        raise LaunchError(f"cannot create the pilot sandbox {sandbox}: {exc}") from exc


class LocalLauncher(Launcher):
    def __init__(self, hub, pilot) -> None:
        super().__init__(hub, pilot)
        self.child: Child | None = None
        self.sandbox: str | None = None  # set once launch made it (ours, private)

    @property
    def err_path(self) -> str:
        return os.path.join(self.sandbox or self.pilot.sandbox, "agent.err")

    @property
    def out_path(self) -> str:
        return os.path.join(self.sandbox or self.pilot.sandbox, "agent.out")

    def _keep_child(self, child: Child) -> None:
        self.child = child

    def launch(self) -> None:
        hub = self.hub
        sandbox = local_sandbox_path(self)
        cfg = self.agent_config(hub.address, sandbox)
        if hub.agents_follow_hub_process:
            cfg.hub_pid = os.getpid()  # the agent ends its units at once if we die
        make_local_sandbox(self, sandbox, cfg)
        self.sandbox = sandbox
        cfg_path = os.path.join(sandbox, AGENT_CONFIG)
        env = dict(os.environ)
        env["PYTHONPATH"] = _RPG_ROOT + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        argv = [sys.executable, "-m", "rpg.agent", "--config", cfg_path]
        # The spawn runs on a thread: if the pilot is canceled meanwhile the agent still starts,
        # so keep hold of it for stop() rather than leave it behind.
        try:
            self.child = hub.pool.spawn.run(spawn, argv, cwd=self.sandbox, env=env,
                                            stdout_path=self.out_path,
                                            stderr_path=self.err_path, timeout=30,
                                            keep=self._keep_child)
        except SpawnError as exc:
            raise LaunchError(str(exc)) from exc
        hub.log.info("agent_started", pilot=self.pilot.uid, pid=self.child.pid)

    def poll(self, timeout: float) -> str | None:
        assert self.child is not None
        rc = self.child.wait(timeout=timeout)
        if rc is None:
            return None
        try:
            tail = self.hub.pool.for_path(self.err_path).run(read_tail, self.err_path, 2000,
                                                             timeout=10)
        except (IOPoolError, OSError) as exc:
            tail = f"(agent.err unreadable: {exc})"
        lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
        return f"exit code {rc}" + (f"; stderr: {' | '.join(lines[-5:])}" if lines else "")

    def ended_cleanly(self) -> bool:
        return self.child is not None and self.child.returncode == 0

    def stop(self, grace: float) -> None:
        child = self.child
        if child is not None and child.returncode is None and child.wait(timeout=grace) is None:
            child.terminate(grace=2.0)
        if self.sandbox is None:
            return  # nothing of ours started (a sandbox refused is not ours to sweep)
        # Units live in their own sessions; if the agent died hard they are orphans now. A
        # daemon that cleared its environment is still found by its cwd in the sandbox.
        killed = self.hub.pool.spawn.run(kill_pilot_processes, self.key, self.sandbox,
                                         timeout=30)
        if killed:
            self.hub.log.warning("orphan_unit_processes_killed", pilot=self.pilot.uid,
                                 count=killed)
        self.forget_token(self.sandbox)
