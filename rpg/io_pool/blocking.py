"""The original, blocking versions of functions that gevent's monkey-patching replaces.

Functions that run in an io_pool lane execute on a real OS thread. If the application has
monkey-patched, the patched versions of ``time.sleep``, ``subprocess.Popen``, ``os.waitpid``
and friends would try to use a gevent hub in that worker thread (and child watchers only work
on the main thread's loop), so lane code uses these originals instead.
"""

from __future__ import annotations

import importlib.util
import subprocess as _subprocess_mod
from types import ModuleType

from gevent.monkey import get_original


def _private_subprocess() -> ModuleType:
    """A private copy of the stdlib ``subprocess`` module that monkey-patching never touches.

    ``gevent.monkey.patch_subprocess`` rewrites names inside the stdlib module (on Python 3.11 it
    sets ``subprocess._fork_exec`` and ``subprocess._posixsubprocess`` to None), and the original
    ``Popen`` class reads those module globals at call time, so ``get_original("subprocess",
    "Popen")`` fails with "'NoneType' object is not callable" once the application has patched
    (whether it patched before or after importing rpg). A copy executed from the same source has
    globals of its own. posix_spawn is turned off in it: ``os.posix_spawn`` is looked up at call
    time and may be gevent's, which does not work off the main thread's loop.
    """
    spec = importlib.util.find_spec("subprocess")
    if spec is None or spec.loader is None:  # pragma: no cover - the stdlib always has it
        return _subprocess_mod
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._USE_POSIX_SPAWN = False  # type: ignore[attr-defined]
    return mod


_subprocess = _private_subprocess()

sleep = get_original("time", "sleep")
Popen: type[_subprocess_mod.Popen] = _subprocess.Popen
waitpid = get_original("os", "waitpid")
select = get_original("select", "select")
DEVNULL = _subprocess_mod.DEVNULL

__all__ = ["DEVNULL", "Popen", "select", "sleep", "waitpid"]
