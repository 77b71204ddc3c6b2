"""Launchers start a pilot's agent on its resource, watch it, and stop it.

``launcher_for`` picks one by the description's resource: ``local`` (a child process here),
``ssh://`` (paramiko), ``slurm`` (a batch job) and ``slurm+ssh://`` (a batch job submitted on
a login node over SSH).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rpg.hub.launchers.base import Launcher, LaunchError
from rpg.hub.launchers.local import LocalLauncher

if TYPE_CHECKING:
    from rpg.hub.hub import Hub
    from rpg.hub.records import PilotRecord


def launcher_for(hub: "Hub", pilot: "PilotRecord") -> Launcher:
    resource = pilot.desc["resource"]
    if resource == "local":
        return LocalLauncher(hub, pilot)
    if resource.startswith("ssh://"):
        from rpg.hub.launchers.ssh import SSHLauncher

        return SSHLauncher(hub, pilot)
    if resource == "slurm":
        from rpg.hub.launchers.slurm import SlurmLauncher

        return SlurmLauncher(hub, pilot)
    if resource.startswith("slurm+ssh://"):
        from rpg.hub.launchers.slurm_ssh import SlurmSSHLauncher

        return SlurmSSHLauncher(hub, pilot)
    raise LaunchError(f"resource {resource!r}: no launcher for it in this version of rpg")


__all__ = ["Launcher", "LaunchError", "LocalLauncher", "launcher_for"]
