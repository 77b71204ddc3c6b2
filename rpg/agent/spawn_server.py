"""The agent's spawner: a small process that starts the units' processes and reports their exits.

    python -I -S spawn_server.py REQUEST_FD REPLY_FD      (stdlib only; the agent starts it)

Why a process of its own: every ``fork``/``clone`` copies the parent's file-descriptor table,
and an agent with 10,000 running units held 10,000 pidfds, so each new spawn got slower as
units piled up. This process holds a handful of fds and no pidfd at all, starts each unit with
``os.posix_spawn`` (glibc: ``clone(CLONE_VM|CLONE_VFORK)``, no page-table copy), finds exits
with ``waitid`` on SIGCHLD, and tells the agent about many starts and exits in one frame.

What it guarantees:
- each unit leads its own process group (``setpgid``: cancel kills its whole tree) in this
  process's session, which has no controlling terminal. Not a session of its own: with
  autogroup scheduling (on in most distributions' kernels) every session is one scheduling
  entity, and 4,000 units starting or dying at once, a session each, outweighed the agent's
  and the hub's loops (their lag during such bursts); the units share one entity now;
- each starts in its sandbox (the agent makes it, with empty stdout and stderr files, in a
  disk lane; made here if missing) with stdin from /dev/null and stdout/stderr to its files,
  with default signal dispositions and the environment the agent gave;
- when a unit's leader exits its whole group is SIGKILLed while the leader is still a zombie
  (its pgid cannot be reused yet), then the leader is reaped: nothing is left behind;
- ``kill`` signals a unit's group only while its leader is unreaped (no pid reuse);
- ``nice`` sets this session's autogroup nice value (``/proc/self/autogroup``), which its
  units share: while thousands of units start or die at once the cores are full, and at nice
  0 the agent's, the hub's and the application's loops (sessions of their own) waited tens of
  ms for a core each time they woke (their lag p99 while 10,000 were canceled was 40-100 ms;
  at nice 19, 4-13). Best effort: a kernel without autogroups (or a cgroup with its own CPU
  controller) ignores it; the reply says what happened;
- when the agent goes (its end of the request pipe closes: exit, crash or SIGKILL), every
  unit still running is killed and reaped, and this process exits. It ignores SIGINT/SIGTERM:
  the agent decides when units end, and tells it.

Frames, both ways: a 4-byte little-endian length, then ``marshal`` of a list of messages (the
two ends are the same interpreter). Requests: ``["env", {base environment}]``,
``["spawn", key, argv, cwd, {environment additions}, stdout path, stderr path]``,
``["kill", key, signal]``, ``["nice", value]``. Replies: ``["started", key, pid]``,
``["failed", key, errno, text]``, ``["exited", key, exit code (negative: the signal)]``,
``["niced", value, None or the error's text]``.
"""

from __future__ import annotations

import errno
import marshal
import os
import select
import signal
import struct
import sys
import time

HEADER = struct.Struct("<I")
# Dispositions a unit must not inherit: this process ignores SIGINT/SIGTERM, and Python ignores
# SIGPIPE and SIGXFSZ (subprocess's restore_signals resets the same ones).
DEFAULT_IN_CHILD = (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ,
                    signal.SIGQUIT, signal.SIGHUP)
OUT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
REPLY_EVERY = 4  # replies sent after this many, not after a whole batch of spawns
AUTOGROUP = "/proc/self/autogroup"
STATS_FILE = "spawner.{pid}.stats.json"  # in the pilot sandbox, written as this process exits
# The kernel takes one autogroup nice change per 100 ms from an unprivileged user, machine-wide
# (EAGAIN otherwise: two pilots starting together): tried again, up to NICE_TRIES times.
NICE_RETRY_S = 0.12
NICE_TRIES = 50


def set_autogroup_nice(value: object, path: str = AUTOGROUP) -> None:
    """Write ``value`` as the autogroup nice value of the session ``path`` names (ours, or a
    process of this user's: ``/proc/PID/autogroup``). Raises OSError: EAGAIN is the kernel's
    rate limit (try again after NICE_RETRY_S), ENOENT a kernel without autogroups."""
    text = str(int(value))  # type: ignore[call-overload]
    with open(path, "w") as fh:
        fh.write(text)


def nice_problem(exc: OSError, path: str = AUTOGROUP) -> str:
    """Why ``set_autogroup_nice`` failed, in words."""
    return f"{path}: {exc.strerror or exc}" + (
        " (no autogroup scheduling in this kernel)" if exc.errno == errno.ENOENT else "")


class Server:
    def __init__(self, req_fd: int, rep_fd: int) -> None:
        self.req_fd, self.rep_fd = req_fd, rep_fd
        self.home = os.getcwd()
        self.base_env: dict[str, str] = {}
        self.live: dict[int, object] = {}  # pid -> key
        self.pids: dict[object, int] = {}  # key -> pid
        self.replies: list[list] = []
        # A SIGCHLD came since the last reap: waitid(P_ALL) looks at every child, 10,000 of
        # them when 10,000 units run, so it is not called after every spawn, only after exits.
        self.exits = False
        self.nice: object = None  # the autogroup nice value asked for and not set yet
        self.nice_tries = 0
        self.nice_next = 0.0  # when to try it again (monotonic)
        # Where its time goes (STATS_FILE, written at exit): the wall time spent inside
        # posix_spawn, which returns only once the child has exec'd (CLONE_VFORK), and in
        # select, waiting for work. bench/throughput.py reads it: it is the serial path.
        self.spawns = 0
        self.spawn_s = 0.0
        self.select_s = 0.0
        self.started = time.monotonic()

    def run(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, self._on_chld)
        buf = bytearray()
        try:
            while True:
                t0 = time.monotonic()
                ready, _, _ = select.select([self.req_fd, wake_r], [], [], self.wait_s())
                self.select_s += time.monotonic() - t0
                if wake_r in ready:
                    while True:
                        try:
                            if not os.read(wake_r, 4096):
                                break
                        except BlockingIOError:
                            break
                if self.req_fd in ready:
                    data = os.read(self.req_fd, 1 << 20)
                    if not data:
                        return  # the agent is gone
                    buf += data
                    while len(buf) >= 4:
                        (size,) = HEADER.unpack_from(buf)
                        if len(buf) < 4 + size:
                            break
                        messages = marshal.loads(bytes(buf[4:4 + size]))
                        del buf[:4 + size]
                        for msg in messages:
                            self.handle(msg)
                            if len(self.replies) >= REPLY_EVERY:
                                self.reap()
                                self.flush()  # a unit's start is news: don't sit on it
                    os.chdir(self.home)  # never sit in a unit sandbox between requests
                self.reap()
                self.set_nice()
                self.flush()
        finally:
            self.kill_all()
            signal.set_wakeup_fd(-1)
            for fd in (wake_r, wake_w):  # two fds free for the stats, even from a full table
                os.close(fd)
            self.write_stats()

    def _on_chld(self, *_: object) -> None:
        self.exits = True

    def handle(self, msg: list) -> None:
        op = msg[0]
        if op == "spawn":
            self.spawn(*msg[1:])
        elif op == "kill":
            pid = self.pids.get(msg[1])
            if pid is not None:
                try:
                    os.killpg(pid, msg[2])
                except OSError:
                    pass
        elif op == "env":
            self.base_env = dict(msg[1])
        elif op == "nice":
            self.nice, self.nice_tries, self.nice_next = msg[1], 0, 0.0

    def wait_s(self) -> float | None:
        if self.nice is None:
            return None
        return max(0.0, self.nice_next - time.monotonic())

    def set_nice(self) -> None:
        if self.nice is None or time.monotonic() < self.nice_next:
            return
        value, error = self.nice, None
        try:
            set_autogroup_nice(value)
        except OSError as exc:
            self.nice_tries += 1
            if exc.errno == errno.EAGAIN and self.nice_tries < NICE_TRIES:
                self.nice_next = time.monotonic() + NICE_RETRY_S
                return
            error = nice_problem(exc)
        except Exception as exc:  # a malformed value: say so, never die of it
            error = f"{type(exc).__name__}: {exc}"
        self.nice = None
        self.replies.append(["niced", value, error])

    def spawn(self, key: object, argv: list, cwd: str, extra: dict, out: str, err: str) -> None:
        env = dict(self.base_env)
        env.update(extra)
        try:
            try:  # the agent made it (off this process's path); a chdir is all it costs here
                os.chdir(cwd)
            except FileNotFoundError:
                os.makedirs(cwd, exist_ok=True)
                os.chdir(cwd)
            t0 = time.monotonic()
            pid = os.posix_spawn(
                executable(argv[0], env), argv, env, setpgroup=0, setsigdef=DEFAULT_IN_CHILD,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_OPEN, 1, out, OUT_FLAGS, 0o666),
                              (os.POSIX_SPAWN_OPEN, 2, err, OUT_FLAGS, 0o666)])
        except OSError as exc:
            self.replies.append(["failed", key, exc.errno or 0, exc.strerror or str(exc)])
            return
        except Exception as exc:  # a malformed request: say so, never die of it
            self.replies.append(["failed", key, 0, f"{type(exc).__name__}: {exc}"])
            return
        self.spawn_s += time.monotonic() - t0
        self.spawns += 1
        self.live[pid] = key
        self.pids[key] = pid
        self.replies.append(["started", key, pid])

    def reap(self) -> None:
        if not self.exits:
            return
        self.exits = False  # a SIGCHLD from here on sets it again: nothing is missed
        while self.live:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or not info.si_pid:
                return
            pid = info.si_pid
            try:  # the leader is a zombie: its group id is still ours to signal
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            _, status = os.waitpid(pid, 0)
            key = self.live.pop(pid, None)
            if key is not None:
                self.pids.pop(key, None)
                self.replies.append(["exited", key, os.waitstatus_to_exitcode(status)])

    def flush(self) -> None:
        if not self.replies:
            return
        body = marshal.dumps(self.replies)
        self.replies = []
        data = memoryview(HEADER.pack(len(body)) + body)
        while data:
            data = data[os.write(self.rep_fd, data):]

    def write_stats(self) -> None:
        """Leave STATS_FILE (this pid's) in the pilot sandbox; best effort: the units are
        already gone, and a disk that refuses it costs only the numbers."""
        stats = {"pid": os.getpid(), "spawns": self.spawns, "spawn_s": round(self.spawn_s, 6),
                 "select_s": round(self.select_s, 6),
                 "alive_s": round(time.monotonic() - self.started, 6)}
        try:
            import json  # here: not on the start-up path of every pilot

            with open(os.path.join(self.home, STATS_FILE.format(pid=os.getpid())), "w") as fh:
                fh.write(json.dumps(stats))
        except Exception:  # best effort: never the reason this process exits badly
            pass

    def kill_all(self) -> None:
        for pid in list(self.live):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in list(self.live):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.live.clear()


def executable(name: str, env: dict) -> str:
    """``name`` as execve needs it: a path as given (relative to the unit's sandbox), or found
    on the unit's own PATH, as subprocess does."""
    if "/" in name:
        return name
    for d in os.get_exec_path(env):
        path = os.path.join(d, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(2, "No such file or directory")


def main(argv: list[str]) -> int:
    req_fd, rep_fd = int(argv[1]), int(argv[2])
    for fd in (req_fd, rep_fd):
        os.set_inheritable(fd, False)  # units must not hold the agent's pipes
    os.set_blocking(rep_fd, True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    Server(req_fd, rep_fd).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
