"""The original, blocking versions of functions that gevent's monkey-patching replaces.

Functions that run in an io_pool lane execute on a real OS thread. If the application has
monkey-patched, the patched versions of ``time.sleep``, ``subprocess.Popen``, ``os.waitpid``
and friends would try to use a gevent hub in that worker thread (and child watchers only work
on the main thread's loop), so lane code uses these originals instead.
"""

from __future__ import annotations

import subprocess as _subprocess_mod

from gevent.monkey import get_original

sleep = get_original("time", "sleep")
Popen: type[_subprocess_mod.Popen] = get_original("subprocess", "Popen")
waitpid = get_original("os", "waitpid")
select = get_original("select", "select")
DEVNULL = _subprocess_mod.DEVNULL

__all__ = ["sleep", "Popen", "waitpid", "select", "DEVNULL"]
