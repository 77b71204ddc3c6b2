"""A unit's process: its command line, and its start, wait and kill through the agent's spawner.

The agent runs a unit's lifecycle (``Agent._unit``, ``PlainUnit``). Its processes are started by
``rpg/agent/spawn_server.py``, a small process of the agent's own (why: see that file), over
two pipes: ``Spawner`` here is the agent's end, on its gevent loop. Requests go out in one
frame per loop iteration, replies (starts and exits of many units) come back in frames a
reader greenlet hands to each unit's ``UnitProcess``. The agent holds no fd per running unit.
"""

from __future__ import annotations

import errno
import marshal
import os
import shlex
import signal
import sys
from typing import Any, Callable, Mapping

import gevent
from gevent.event import Event
from gevent.socket import wait_read, wait_write

from rpg.io_pool import SpawnError, spawn, yield_to_loop
from rpg.io_pool.process import Child
from rpg.io_pool.sweep import kill_stalled_spawners_units, kill_unit_groups

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spawn_server.py")
HEADER_SIZE = 4
PIPE_SIZE = 1 << 20  # a pull of 256 units' requests fits in one write
F_SETPIPE_SZ = 1031
SPAWNERS = 1  # spawner processes. Measured here (2 cores, 2026-12-06, bench/concurrency.py): two
#              gave 0.59x/0.56x the raw spawn rate for 4,000/10,000 sleep units against
#              0.53x/0.46x for one, but with loop lag p99 hub 26-34 ms and agent 40-83 ms
#              against 9-10 and 12-13 (the CPU is full): one, while the CPU is the limit
REPLY_SLICE = 128  # the spawner's replies applied per turn of the loop (an exit wakes a unit)
SPAWN_TIMEOUT_S = 120.0  # a spawn the spawner did not answer (a stalled disk) fails the unit
FD_SHORT = (errno.EMFILE, errno.ENFILE)  # a spawn that hits these waits and retries. Only
#   ENFILE (the system's table full) can come from a start today: a start only replaces the
#   spawner's fds 0-2, which glibc closes before each open (tests/test_spawner.py)
SPAWN_RETRY_S = 300.0  # how long a unit waits out "too many open files" before it fails
NO_SPAWNER_RETRY_S = 0.1  # while a dead spawner is replaced, a spawn looks again this often


def no_spawner() -> SpawnError:
    return SpawnError(errno.EAGAIN, "the agent has no spawner running")


def unit_argv(desc: Mapping[str, Any]) -> list[str]:
    """The command line for a unit; pre_exec lines run in a shell that then execs the unit."""
    argv = [desc["executable"], *desc.get("arguments", [])]
    pre = desc.get("pre_exec") or []
    if not pre:
        return argv
    script = "set -e\n" + "\n".join(pre) + "\nexec " + " ".join(shlex.quote(a) for a in argv)
    return ["/bin/sh", "-c", script]


KILL_WAIT_S = 30.0  # how long a SIGKILLed group may take to go before the unit ends anyway


class SpawnerGone(SpawnError):
    """The spawner process died: the units it had started were killed with it."""


def start_error(proc: "UnitProcess", argv: list[str]) -> SpawnError:
    """What a start the spawner refused raises (``proc.error`` is set)."""
    if isinstance(proc.error, SpawnerGone):
        return proc.error
    return SpawnError(proc.error.errno, f"cannot start {argv[0]!r}: {proc.error.strerror}")


def start_timed_out(argv: list[str], timeout: float) -> SpawnError:
    return SpawnError(errno.ETIMEDOUT, f"the spawner did not start {argv[0]!r} in {timeout:g} s")


class UnitProcess:
    """One unit's process as the spawner reports it."""

    __slots__ = ("key", "uid", "pid", "returncode", "error", "_started", "_exited", "_spawner")

    def __init__(self, spawner: "Spawner", key: int, uid: str) -> None:
        self._spawner = spawner
        self.key = key
        self.uid = uid
        self.pid: int | None = None
        self.returncode: int | None = None
        self.error: SpawnError | None = None
        self._started = Event()
        self._exited = Event()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait (on the loop) for the exit; the exit code, None on timeout. Raises SpawnerGone
        if the spawner died first."""
        self._exited.wait(timeout)
        if self.error is not None:
            raise self.error
        return self.returncode

    def signal_group(self, sig: int) -> None:
        if self.returncode is None and self.error is None:
            self._spawner.send(["kill", self.key, int(sig)])

    def terminate(self, grace: float = 3.0) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace`` s; the exit code (None: not seen)."""
        if self.returncode is not None or self.error is not None:
            return self.returncode
        self.signal_group(signal.SIGTERM)
        self._exited.wait(grace)
        if self.returncode is None and self.error is None:
            self.signal_group(signal.SIGKILL)
            self._exited.wait(KILL_WAIT_S)
        return self.returncode


class Spawner:
    """The agent's end of its spawner process. ``start`` is blocking (run it in a lane); the
    rest runs on the agent's loop."""

    def __init__(self, base_env: Mapping[str, str], home: str, own_env: Mapping[str, str],
                 log: Any, on_gone: Callable[["Spawner", str, list], None],
                 nice: int = 0) -> None:
        self.base_env = dict(base_env)
        self.nice = nice  # the units' autogroup nice value (spawn_server.py); 0: as it is
        self.niced: dict[str, Any] | None = None  # what the spawner said it did
        self.home = home
        self.own_env = dict(own_env)
        self.log = log
        self.on_gone = on_gone  # the agent kills what a dead spawner left
        self.procs: dict[int, UnitProcess] = {}
        self.next_key = 0
        self.outbox: list[list] = []
        self.child: Child | None = None
        self.closed = False
        self._wake = Event()
        self._greenlets: list[Any] = []

    def start(self) -> None:
        """Start the spawner process (blocking: run it in the spawn lane)."""
        req_r, req_w = os.pipe2(os.O_CLOEXEC)
        rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
        try:
            for fd in (req_w, rep_w):
                try:
                    import fcntl
                    fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
                except OSError:
                    pass  # a smaller pipe only means more writes
            self.child = spawn([sys.executable, "-I", "-S", SERVER, str(req_r), str(rep_w)],
                               cwd=self.home, env=self.own_env, pass_fds=(req_r, rep_w))
        except BaseException:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(rep_w)
        os.set_blocking(req_w, False)
        os.set_blocking(rep_r, False)
        self.req_fd, self.rep_fd = req_w, rep_r
        self.outbox[:0] = [["env", self.base_env]] + ([["nice", self.nice]] if self.nice else [])

    def run(self) -> None:
        """Start the writer and reader greenlets (on the loop, after ``start``)."""
        self._greenlets = [gevent.spawn(self._writer), gevent.spawn(self._reader)]
        self._wake.set()

    def spawn(self, uid: str, argv: list[str], cwd: str, env: Mapping[str, str], stdout: str,
              stderr: str, timeout: float) -> UnitProcess:
        """Ask for a unit's start and wait for the answer. A caller killed meanwhile (cancel)
        leaves a kill request behind it: the process, if it started, does not outlive it."""
        proc = self.request(uid, argv, cwd, env, stdout, stderr)
        try:
            if not proc._started.wait(timeout):
                raise start_timed_out(argv, timeout)
        except BaseException:
            proc.signal_group(signal.SIGKILL)
            raise
        if proc.error is not None:
            raise start_error(proc, argv)
        return proc

    def request(self, uid: str, argv: list[str], cwd: str, env: Mapping[str, str], stdout: str,
                stderr: str) -> UnitProcess:
        """Ask for a unit's start, without waiting: its ``_started`` is set when the spawner
        answers (then ``error``, if any, says why it did not start: ``start_error``)."""
        if self.closed:
            raise SpawnerGone(errno.EPIPE, "the agent's spawner has stopped")
        key = self.next_key = self.next_key + 1
        proc = self.procs[key] = UnitProcess(self, key, uid)
        self.send(["spawn", key, list(argv), cwd, dict(env), stdout, stderr])
        return proc

    def send(self, msg: list) -> None:
        self.outbox.append(msg)
        self._wake.set()

    def _writer(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if not self.outbox:
                continue
            body = marshal.dumps(self.outbox)
            self.outbox = []
            data = memoryview(len(body).to_bytes(HEADER_SIZE, "little") + body)
            try:
                while data:
                    try:
                        data = data[os.write(self.req_fd, data):]
                    except BlockingIOError:
                        wait_write(self.req_fd)
            except OSError as exc:  # the spawner is gone: the reader says so
                self.log.warning("spawner_write_failed", error=str(exc))
                return

    def _reader(self) -> None:
        buf = bytearray()
        while True:
            try:
                data = os.read(self.rep_fd, 1 << 20)
            except BlockingIOError:
                wait_read(self.rep_fd)
                continue
            except OSError:
                data = b""
            if not data:
                self._gone()
                return
            buf += data
            while len(buf) >= HEADER_SIZE:
                size = int.from_bytes(buf[:HEADER_SIZE], "little")
                if len(buf) < HEADER_SIZE + size:
                    break
                messages = marshal.loads(bytes(buf[HEADER_SIZE:HEADER_SIZE + size]))
                del buf[:HEADER_SIZE + size]
                for i, msg in enumerate(messages):
                    if i and i % REPLY_SLICE == 0:
                        yield_to_loop()  # 10,000 exits at once: 1,500 in one go held it 16 ms
                    self._apply(msg)

    def _apply(self, msg: list) -> None:
        op = msg[0]
        if op == "niced":
            self.niced = {"value": msg[1], "error": msg[2]}
            if msg[2] is None:
                self.log.info("units_nice_set", nice=msg[1])
            else:  # the units compete with the loops at nice 0: slower loops, nothing lost
                self.log.warning("units_nice_not_set", nice=msg[1], error=msg[2])
            return
        proc = self.procs.get(msg[1])
        if proc is None:
            return
        if op == "started":
            proc.pid = msg[2]
            proc._started.set()
        elif op == "exited":
            proc.returncode = msg[2]
            del self.procs[proc.key]
            proc._exited.set()
            proc._started.set()
        elif op == "failed":
            proc.error = SpawnError(msg[2], msg[3])
            del self.procs[proc.key]
            proc._started.set()
            proc._exited.set()

    def _gone(self) -> None:
        if self.closed:
            return
        self.closed = True
        rc = self.child.wait(timeout=5) if self.child is not None else None
        reason = f"the agent's spawner process died (exit code {rc})"
        self.log.error("spawner_died", exit_code=rc, units=len(self.procs))
        left = [(p.pid, p.uid) for p in self.procs.values() if p.pid is not None]
        for proc in self.procs.values():
            proc.error = SpawnerGone(errno.EPIPE, reason + "; the unit was killed")
            proc._started.set()
            proc._exited.set()
        self.procs.clear()
        self.on_gone(self, reason, left)

    def close(self, timeout: float = 10.0,
              kill_units: Callable[[int, list], int] | None = None) -> None:
        """Stop the spawner: it kills and reaps what still runs, then exits; reap it. One that
        does not exit within ``timeout`` (stalled) is stopped (SIGSTOP), so that its units stay
        its unreaped children, and ``kill_units(its pid, [(pid, uid) of the units it said it
        started]``) kills their groups (blocking: the caller runs it in a lane); then it is
        SIGKILLed."""
        if self.child is None:
            return
        self.closed = True
        gevent.killall([g for g in self._greenlets if g is not gevent.getcurrent()],
                       timeout=1.0)
        for fd in (self.req_fd, self.rep_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.child.wait(timeout=timeout) is None:
            killed: Any = None
            try:
                os.kill(self.child.pid, signal.SIGSTOP)
                if kill_units is not None:
                    killed = kill_units(self.child.pid, [(p.pid, p.uid) for p in
                                                         self.procs.values() if p.pid is not None])
            except Exception as exc:  # a spawner gone meanwhile, a lane that refused
                killed = f"{type(exc).__name__}: {exc}"
            self.log.warning("spawner_killed_at_close", units_killed=killed)
            self.child.kill_group(signal.SIGKILL)
            self.child.wait(timeout=5)
        self.child = None


class Spawners:
    """The agent's spawner processes: started, used in turn, each replaced when it dies (its
    units FAIL with SpawnerGone; the process groups they left are killed)."""

    def __init__(self, pool: Any, base_env: Mapping[str, str], home: str, log: Any,
                 counters: dict, stopping: Any, fatal: Callable[[str], None],
                 count: int = SPAWNERS, nice: int = 0) -> None:
        self.pool, self.base_env, self.home, self.log = pool, base_env, home, log
        self.nice = nice
        self.counters, self.stopping, self.fatal = counters, stopping, fatal
        self.slots: list[Spawner | None] = [None] * count
        self.turn = 0

    def start(self) -> None:
        for slot in range(len(self.slots)):
            self._start(slot)

    def _start(self, slot: int) -> None:
        # Without RPG_PILOT_KEY: a sweep finds units, and the spawner ends with the agent
        # (its request pipe closes), killing what still runs.
        spawner = Spawner(self.base_env, self.home, os.environ, self.log, self._gone, self.nice)
        self.pool.spawn.run(spawner.start, timeout=30)
        spawner.run()
        self.slots[slot] = spawner

    def _gone(self, spawner: Spawner, reason: str, left: list) -> None:
        slot = self.slots.index(spawner)
        self.slots[slot] = None
        self.counters["spawner_restarts"] = self.counters.get("spawner_restarts", 0) + 1

        def restart() -> None:
            try:
                killed = self.pool.spawn.run(kill_unit_groups, left, timeout=30)
                self.log.warning("spawner_restart", reason=reason, killed=killed)
                if not self.stopping.is_set():
                    self._start(slot)
            except Exception as exc:
                self.log.error("spawner_not_restarted", error=str(exc))
                self.fatal(f"{reason}; no new spawner: {exc}")

        gevent.spawn(restart)

    def spawn(self, uid: str, argv: list[str], sandbox: str, env: Mapping[str, str],
              stdout: str, stderr: str) -> UnitProcess:
        deadline = gevent.get_hub().loop.now() + SPAWN_TIMEOUT_S
        while True:  # the spawners in turn; one that is being replaced is skipped
            spawner = self.next()
            if spawner is not None:
                break
            if gevent.get_hub().loop.now() > deadline:
                raise no_spawner()
            gevent.sleep(NO_SPAWNER_RETRY_S)
        return spawner.spawn(uid, argv, sandbox, env, stdout, stderr, SPAWN_TIMEOUT_S)

    def next(self) -> Spawner | None:
        """The spawner whose turn it is; None while none runs (one is being replaced)."""
        live = [s for s in self.slots if s is not None]
        if not live:
            return None
        self.turn += 1
        return live[self.turn % len(live)]

    def niced(self) -> list[dict[str, Any] | None]:
        """Per spawner: the autogroup nice value it set, or why not (None: not asked, or
        no answer yet)."""
        return [s.niced if s is not None else None for s in self.slots]

    def close(self) -> None:
        """Stop every spawner. A stalled one's units (it cannot kill them, and once it is
        SIGKILLed they are nobody's) have their groups killed here, from the spawn lane."""
        def kill_units(pid: int, leaders: list) -> int:
            return self.pool.spawn.run(kill_stalled_spawners_units, pid, leaders, timeout=30)

        for spawner in self.slots:
            if spawner is not None:
                spawner.close(kill_units=kill_units)
