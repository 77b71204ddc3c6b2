"""Process spawn (in a lane) and reap (on the loop, through a pidfd; no thread per process).

``spawn`` is blocking and runs in the spawn lane: it opens the output files, starts the child as
the leader of a new session and process group, and opens a pidfd for it. ``Child.wait`` runs on
the loop: it sleeps until the pidfd is readable (the child exited), kills whatever is left of its
process group, and reaps it with a non-blocking wait. ``Child.terminate`` sends SIGTERM to the
group and SIGKILL after a grace period. Nothing is left as a zombie or an orphan.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Mapping, Sequence

import gevent
from gevent.event import Event
from gevent.socket import wait_read

from rpg.io_pool import blocking


class SpawnError(OSError):
    """The process could not be started (no such executable, bad cwd, ...)."""


class Child:
    """A child process that leads its own process group, watched through a pidfd."""

    def __init__(self, popen: Any, pidfd: int) -> None:
        self._popen = popen
        self.pid: int = popen.pid
        self.pgid: int = popen.pid
        self.pidfd = pidfd
        self.returncode: int | None = None
        self._exited = Event()
        self._waiting = False

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait (on the loop) until the child exits; reap it. Returns the exit code.

        A negative code is the signal that ended it. Returns None on timeout. Only one greenlet
        watches the pidfd; any other caller waits for that one.
        """
        if self.returncode is not None:
            return self.returncode
        if self._waiting:
            self._exited.wait(timeout)
            return self.returncode
        self._waiting = True
        try:
            try:
                wait_read(self.pidfd, timeout=timeout)
            except gevent.socket.timeout:
                return None
            self._reap()
            return self.returncode
        finally:
            self._waiting = False

    def _reap(self) -> None:
        # The leader is a zombie now: its pid cannot be reused yet, so killing its group is safe.
        self.kill_group(signal.SIGKILL)
        rc = self._popen.poll()
        delay = 0.0005
        while rc is None and delay < 1.0:  # pidfd said exited; the status is a moment away
            gevent.sleep(delay)
            delay *= 2
            rc = self._popen.poll()
        if rc is not None:
            self.returncode = rc
            self._close_fd()
            self._exited.set()

    def _close_fd(self) -> None:
        if self.pidfd >= 0:
            try:
                os.close(self.pidfd)
            finally:
                self.pidfd = -1

    def kill_group(self, sig: int) -> bool:
        """Signal the whole process group; False if it is already gone."""
        try:
            os.killpg(self.pgid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def terminate(self, grace: float = 3.0) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace`` s, wait for the exit (on the loop)."""
        if self.returncode is not None:
            self.kill_group(signal.SIGKILL)
            return self.returncode
        self.kill_group(signal.SIGTERM)
        rc = self.wait(timeout=grace)
        if rc is None:
            self.kill_group(signal.SIGKILL)
            rc = self.wait(timeout=30)
        return rc

    def __del__(self) -> None:  # last resort: never leak the fd
        try:
            self._close_fd()
        except Exception:
            pass


def spawn(
    argv: Sequence[str],
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    stdout_path: str | None = None,
    stderr_path: str | None = None,
    stdin_devnull: bool = True,
    pass_fds: Sequence[int] = (),
) -> Child:
    """Start ``argv`` as a new session/process-group leader. Blocking: run it in a lane."""
    out = open(stdout_path, "wb") if stdout_path else open(os.devnull, "wb")
    try:
        err = open(stderr_path, "wb") if stderr_path else open(os.devnull, "wb")
        try:
            try:
                popen = blocking.Popen(
                    list(argv),
                    cwd=cwd,
                    env=dict(env) if env is not None else None,
                    stdin=blocking.DEVNULL if stdin_devnull else None,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=tuple(pass_fds),
                )
            except OSError as exc:
                raise SpawnError(exc.errno, f"cannot start {argv[0]!r}: {exc.strerror}") from exc
        finally:
            err.close()
    finally:
        out.close()
    return watch(popen)


def watch(popen: Any) -> Child:
    """A Child for a process just started as a session leader (original blocking Popen):
    opens its pidfd, or kills and reaps it if that fails. Blocking: run it in a lane."""
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        raise
    return Child(popen, pidfd)
