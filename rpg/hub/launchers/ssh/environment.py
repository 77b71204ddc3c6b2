"""The agent's Python environment on a remote host (RADICAL-Pilot's ``virtenv_mode``).

``PilotDescription.remote_env`` chooses:

- ``create`` (default): if ``remote_python`` has the agent's packages (and cloudpickle at the
  client's version, which function units need), use it as it is; else use, or build once, a
  virtual environment ``<remote_env_cache>/env-<key>-py<X><Y>`` (default cache
  ``~/.cache/rpg``), where ``key`` hashes the client's versions of the agent's packages and
  their dependencies, installed there at exactly those versions. Builders take an exclusive
  ``flock`` on ``env-….lock`` (released if a builder dies), build in place and write
  ``.rpg-ready`` last: an environment without it is half-built, never used, and rebuilt. A pip
  failure fails the pilot with pip's last lines. With ``remote_env_wheels`` (a directory of
  wheels on the client), the wheels are uploaded to the pilot sandbox and installed with
  ``--no-index`` and no pip configuration: for hosts that reach no package index.
- ``use``: ``remote_python`` as it is, checked first (a clear error if it lacks a package).
- ``none``: no check at all (the agent's own import error, if any, is the reason).

The bootstrap is ``env_bootstrap.py``, run by the remote python from stdin (standard library
only, Python 3.8+).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex

MODES = ("create", "use", "none")
AGENT_DISTS = ("gevent", "zerorpc", "numpy", "structlog", "cloudpickle")
ENV_FAILED = 94  # exit status: the environment could not be checked or built
NEED_WHEELS = 95  # exit status: an environment must be built and the wheels are not there
BUILD_TIMEOUT = 1800.0  # waiting for another builder, and building


@functools.lru_cache(maxsize=1)
def pins() -> dict[str, str]:
    """name -> version of the agent's packages and their installed dependencies, here."""
    import importlib.metadata as md

    out: dict[str, str] = {}
    todo = list(AGENT_DISTS)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in out:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency not installed here: not pinned
        out[key] = dist.version
        for req in dist.requires or []:
            name_part, _, marker = req.partition(";")
            if marker and not _applies(marker):
                continue
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", name_part)
            if m:
                todo.append(m.group(1))
    return dict(sorted(out.items()))


def _applies(marker: str) -> bool:
    """Whether a requirement's environment marker holds here (no extras are asked for)."""
    if "extra" in marker:
        return False
    try:
        from packaging.markers import Marker
    except ImportError:  # without packaging: pin it (an extra package, never a missing one)
        return True
    try:
        return bool(Marker(marker.strip()).evaluate())
    except Exception:
        return True


def env_key(p: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:16]


_REMOTE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "env_bootstrap.py")



def bootstrap_script(python: str, mode: str, cache: str, wheels: str | None) -> str:
    """A sh script: runs the bootstrap on ``python``; prints ``ENV ...`` and ``PYTHON path``."""
    p = pins()
    top = [d for d in AGENT_DISTS if d in p]
    args = [mode, cache, env_key(p), json.dumps(p), json.dumps(top), wheels or "-",
            str(BUILD_TIMEOUT), str(ENV_FAILED), str(NEED_WHEELS)]
    with open(_REMOTE_PATH, encoding="utf-8") as fh:
        remote = fh.read()
    q = shlex.quote
    return (f"umask 077\nexec {q(python)} - {' '.join(q(a) for a in args)} <<'__RPG_ENV__'\n"
            f"{remote}\n__RPG_ENV__\n")


def parse(out: str) -> tuple[str, str]:
    """(python path, what happened) from the script's stdout."""
    python = what = ""
    for line in out.splitlines():
        if line.startswith("PYTHON "):
            python = line[len("PYTHON "):].strip()
        elif line.startswith("ENV "):
            what = line[len("ENV "):].strip()
    return python, what
