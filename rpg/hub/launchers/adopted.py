"""The launcher of a pilot that a restarted hub adopted (rpg/hub/restore.py): its agent was
started by the hub process that died, and outlived it (it waits up to ``heartbeat_timeout``
for a hub to answer again).

The hub holds no handle on that agent. On this machine (``resource="local"``) it watches the
agent's process by the pid the agent gave when it called in, checked against the agent's
command line (its sandbox's agent.json), and at stop it signals it and sweeps the pilot's unit
processes, as the local launcher does; its exit code is the one the agent left in
agent.stats.json. Elsewhere (SSH, SLURM) the hub watches the heartbeat only: an agent that
died shows as a heartbeat lost, and at stop the agent hears "shutdown" on its next pull.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import gevent
import psutil

from rpg.hub.launchers.base import AGENT_CONFIG, Launcher
from rpg.io_pool.sweep import kill_pilot_processes

CHECK_S = 0.5  # how often a local agent's process is looked at


def _agent_alive(pid: int, marker: str) -> bool:
    """Is ``pid`` still that agent (not a zombie, not a process that took its pid)? Reads
    /proc: a lane's work."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and marker in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _exit_code(sandbox: str) -> int | None:
    try:
        with open(os.path.join(sandbox, "agent.stats.json")) as fh:
            code = json.load(fh).get("exit_code")
        return code if isinstance(code, int) else None
    except (OSError, ValueError, AttributeError):
        return None


class AdoptedLauncher(Launcher):
    def __init__(self, hub: Any, pilot: Any) -> None:
        super().__init__(hub, pilot)
        pid = pilot.agent_info.get("pid")
        self.pid = pid if pilot.desc["resource"] == "local" and isinstance(pid, int) else None
        self.marker = os.path.join(pilot.sandbox, AGENT_CONFIG)
        self.code: int | None = None
        self.gone = False

    def launch(self) -> None:  # pragma: no cover - never launched: adopted
        raise NotImplementedError

    def queued(self) -> bool:
        """A batch job may still be queued: it calls in when it starts."""
        return (not self.pilot.registered.is_set()
                and self.pilot.desc["resource"].startswith("slurm"))

    def _alive(self) -> bool:
        if self.pid is None or self.gone:
            return not self.gone
        lane = self.hub.pool.spawn
        alive = lane.run(_agent_alive, self.pid, self.marker, timeout=30)
        if not alive:
            self.gone = True
            self.code = self.hub.pool.for_path(self.pilot.sandbox).run(
                _exit_code, self.pilot.sandbox, timeout=30)
        return alive

    def poll(self, timeout: float) -> str | None:
        if self.pid is None:  # the heartbeat tells
            gevent.sleep(timeout)
            return None
        deadline = time.monotonic() + timeout
        while self._alive():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            gevent.sleep(min(CHECK_S, left))
        return (f"exit code {self.code}" if self.code is not None
                else f"its process ({self.pid}) is gone, with no exit code left")

    def ended_cleanly(self) -> bool:
        return self.code == 0

    def stop(self, grace: float) -> None:
        if self.pid is None:
            return
        deadline = time.monotonic() + grace
        while self._alive() and time.monotonic() < deadline:
            gevent.sleep(0.1)
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
            if not self._alive():
                break
            try:
                os.kill(self.pid, sig)
            except OSError:
                break
            until = time.monotonic() + wait
            while self._alive() and time.monotonic() < until:
                gevent.sleep(0.1)
        killed = self.hub.pool.spawn.run(kill_pilot_processes, self.key, self.pilot.sandbox,
                                         timeout=30)
        if killed:
            self.hub.log.warning("orphan_unit_processes_killed", pilot=self.pilot.uid,
                                 count=killed)
        self.forget_token(self.pilot.sandbox)
