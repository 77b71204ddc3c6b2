"""A unit's process: its command line, and its start in its sandbox (blocking halves).

The agent runs a unit's lifecycle (``Agent._unit``); it calls ``spawn_unit`` through the spawn
lane and waits for the exit with a pidfd on its loop; output tails are ``rpg.io_pool.tails``.
"""

from __future__ import annotations

import os
import shlex
from typing import Any, Mapping

from rpg.io_pool import Child, spawn


def unit_argv(desc: Mapping[str, Any]) -> list[str]:
    """The command line for a unit; pre_exec lines run in a shell that then execs the unit."""
    argv = [desc["executable"], *desc.get("arguments", [])]
    pre = desc.get("pre_exec") or []
    if not pre:
        return argv
    script = "set -e\n" + "\n".join(pre) + "\nexec " + " ".join(shlex.quote(a) for a in argv)
    return ["/bin/sh", "-c", script]


def spawn_unit(argv: list[str], sandbox: str, env: Mapping[str, str], stdout_name: str,
               stderr_name: str) -> Child:
    """Create the sandbox (if needed) and start the unit there. Blocking."""
    os.makedirs(sandbox, exist_ok=True)
    return spawn(argv, cwd=sandbox, env=env,
                 stdout_path=os.path.join(sandbox, stdout_name),
                 stderr_path=os.path.join(sandbox, stderr_name))
