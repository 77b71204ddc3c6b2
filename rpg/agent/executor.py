"""The executor: the blocking halves of running a unit (spawn in its sandbox, read its output).

The agent calls these through io_pool lanes and waits for exits with pidfds on its loop.
"""

from __future__ import annotations

import os
import shlex
from typing import Any, Mapping

from rpg.io_pool import Child, spawn

TAIL_BYTES = 64 * 1024


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


def read_tail(path: str, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a file as text ('' if it is missing). Blocking."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            if size > limit:
                fh.seek(size - limit)
            else:
                fh.seek(0)
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def read_outputs(sandbox: str, stdout_name: str, stderr_name: str,
                 limit: int = TAIL_BYTES) -> tuple[str, str]:
    """The last ``limit`` bytes of the unit's stdout and stderr. Blocking."""
    return (read_tail(os.path.join(sandbox, stdout_name), limit),
            read_tail(os.path.join(sandbox, stderr_name), limit))
