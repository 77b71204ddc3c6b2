"""The local launcher: the agent is a child process of the application, on this machine."""

from __future__ import annotations

import json
import os
import sys

import gevent
from gevent import GreenletExit

from rpg.agent.cleanup import kill_pilot_processes
from rpg.agent.executor import read_tail
from rpg.hub.launchers.base import Launcher, LaunchError
from rpg.io_pool import Child, SpawnError, spawn

_RPG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__import__("rpg").__file__)))


def write_private_json(path: str, data: dict) -> None:
    """Write ``data`` as JSON readable by the owner only (it holds the pilot token). Blocking."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)


class LocalLauncher(Launcher):
    def __init__(self, hub, pilot) -> None:
        super().__init__(hub, pilot)
        self.child: Child | None = None
        self.sandbox = pilot.sandbox
        self.err_path = os.path.join(self.sandbox, "agent.err")
        self.out_path = os.path.join(self.sandbox, "agent.out")

    def launch(self) -> None:
        hub = self.hub
        cfg = self.agent_config(hub.address, self.sandbox)
        cfg_path = os.path.join(self.sandbox, "agent.json")
        disk = hub.pool.for_path(self.sandbox)
        try:
            disk.run(write_private_json, cfg_path, cfg, timeout=30)
        except OSError as exc:
            raise LaunchError(f"cannot create the pilot sandbox {self.sandbox}: {exc}") from exc
        env = dict(os.environ)
        env["PYTHONPATH"] = _RPG_ROOT + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        argv = [sys.executable, "-m", "rpg.agent", "--config", cfg_path]
        # The spawn runs on a thread: if the pilot is canceled meanwhile the agent still starts,
        # so keep hold of it for stop() rather than leave it behind.
        pending = gevent.spawn(hub.pool.spawn.run, spawn, argv, cwd=self.sandbox, env=env,
                               stdout_path=self.out_path, stderr_path=self.err_path, timeout=30)
        try:
            self.child = pending.get()
        except SpawnError as exc:
            raise LaunchError(str(exc)) from exc
        except GreenletExit:
            try:
                self.child = pending.get(timeout=35)
            except Exception:
                pass
            raise
        hub.log.info("agent_started", pilot=self.pilot.uid, pid=self.child.pid)

    def poll(self, timeout: float) -> str | None:
        assert self.child is not None
        rc = self.child.wait(timeout=timeout)
        if rc is None:
            return None
        tail = self.hub.pool.for_path(self.err_path).run(read_tail, self.err_path, 2000,
                                                         timeout=10)
        lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
        return f"exit code {rc}" + (f"; stderr: {' | '.join(lines[-5:])}" if lines else "")

    def ended_cleanly(self) -> bool:
        return self.child is not None and self.child.returncode == 0

    def stop(self, grace: float) -> None:
        child = self.child
        if child is not None and child.returncode is None and child.wait(timeout=grace) is None:
            child.terminate(grace=2.0)
        # Units live in their own sessions; if the agent died hard they are orphans now.
        killed = self.hub.pool.spawn.run(kill_pilot_processes, self.key, timeout=30)
        if killed:
            self.hub.log.warning("orphan_unit_processes_killed", pilot=self.pilot.uid,
                                 count=killed)
