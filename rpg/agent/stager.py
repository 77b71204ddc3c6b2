"""Staging: the blocking copy/link/move of files between a unit's sandbox and elsewhere.

Every function here blocks and runs in an io_pool lane (chosen by the agent per disk). The
sandbox side of a directive must stay inside its sandbox, also through symlinks.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from typing import Any

from rpg.description import split_url

CHUNK = 1 << 20


class StagingError(OSError):
    """A staging directive failed; the message says which and why."""


def resolve(path: str, unit_sandbox: str, pilot_sandbox: str) -> tuple[str, str | None]:
    """(absolute path, root it must stay inside or None) for a directive path."""
    scheme, rel = split_url(path)
    if scheme == "pilot":
        return os.path.join(pilot_sandbox, rel), pilot_sandbox
    if scheme == "client":  # same machine for a local pilot
        return os.path.abspath(rel), None
    if rel.startswith("/"):
        return rel, None
    return os.path.join(unit_sandbox, rel), unit_sandbox


def _confined(path: str, root: str, what: str) -> None:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise StagingError(f"{what} {path!r} escapes its sandbox (resolves to {real!r})")


def stage(directive: dict[str, Any], direction: str, unit_sandbox: str,
          pilot_sandbox: str) -> dict[str, Any]:
    """Carry out one directive. Returns {"bytes", "seconds"}. Raises StagingError."""
    t0 = time.perf_counter()
    src, src_root = resolve(directive["source"], unit_sandbox, pilot_sandbox)
    dst, dst_root = resolve(directive["target"], unit_sandbox, pilot_sandbox)
    action = directive["action"]
    flags = directive.get("flags") or []
    label = f"{action} {directive['source']} -> {directive['target']}"
    try:
        inner, inner_root = (dst, dst_root) if direction == "in" else (src, src_root)
        if inner_root is not None:
            probe = inner if os.path.lexists(inner) else os.path.dirname(inner)
            _confined(probe, inner_root, "staging target" if direction == "in" else
                      "staging source")
        parent = os.path.dirname(dst)
        if "create_parents" in flags:
            os.makedirs(parent, exist_ok=True)
        nbytes = 0
        if action == "link":
            if os.path.lexists(dst):
                os.unlink(dst)
            os.symlink(src, dst)
        elif action == "move":
            nbytes = _size(src)
            shutil.move(src, dst)
        else:  # copy, transfer (same machine)
            if os.path.isdir(src):
                if "recursive" not in flags:
                    raise StagingError(f"{label}: source is a directory; add the 'recursive' flag")
                shutil.copytree(src, dst, dirs_exist_ok=True)
                nbytes = _size(dst)
            elif stat.S_ISREG(os.stat(src).st_mode):
                shutil.copyfile(src, dst)  # sendfile fast path
                nbytes = os.path.getsize(dst)
            else:  # a pipe or device: stream it (shutil refuses them)
                with open(src, "rb") as fin, open(dst, "wb") as fout:
                    shutil.copyfileobj(fin, fout, CHUNK)
                    nbytes = fout.tell()
    except StagingError:
        raise
    except OSError as exc:
        raise StagingError(f"{label}: {exc.strerror or exc}") from exc
    return {"bytes": nbytes, "seconds": time.perf_counter() - t0}


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def make_sandbox(path: str) -> None:
    os.makedirs(path, exist_ok=True)
