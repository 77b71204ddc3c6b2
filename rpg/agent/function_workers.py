"""The agent's warm function workers: processes started once (in the spawn lane) and reused,
so a function unit costs no fork and no import.

A unit's calls go to one idle worker in one frame; the worker answers one frame per call as it
returns, and an end frame. Pipes are non-blocking and waited on by the unit's own greenlet, so
nothing blocks the loop. A worker that dies (a segfault, ``os._exit``, the OOM killer) fails
only the call it was running, whose reason says so; the calls after it did not start. A unit
past its timeout, or canceled while it runs, has its worker killed. A dead or killed worker is
replaced by the next unit that needs one; a worker whose RSS after a unit exceeds the memory
limit is retired (recycled) between units. ``close`` ends them all with the pilot.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import sys
import time
from typing import Any

import gevent
from gevent.lock import Semaphore
from gevent.socket import wait_read, wait_write

from rpg import calls
from rpg.agent.spawn_server import NICE_RETRY_S, NICE_TRIES, nice_problem, set_autogroup_nice
from rpg.agent.worker import HEADER, MAX_FRAME
from rpg.io_pool import Child, IOPool, IOPoolError, spawn
from rpg.io_pool.sweep import pilot_key


class WorkerGone(Exception):
    """The worker's pipe closed: it died."""


def _take_file(path: str) -> bytes:
    """A value the worker left in a file: read it and remove the file. Blocking (a lane)."""
    with open(path, "rb") as fh:
        data = fh.read()
    os.unlink(path)
    return data


def _start(argv: list[str], cwd: str, env: dict[str, str], log_path: str) -> tuple:
    """Pipes and the worker process. Blocking: runs in the spawn lane."""
    to_r, to_w = os.pipe2(os.O_CLOEXEC)
    from_r, from_w = os.pipe2(os.O_CLOEXEC)
    try:
        child = spawn([*argv, str(to_r), str(from_w)], cwd=cwd, env=env,
                      stdout_path=log_path, stderr_path=log_path, pass_fds=(to_r, from_w))
    except BaseException:
        for fd in (to_r, to_w, from_r, from_w):
            os.close(fd)
        raise
    os.close(to_r)
    os.close(from_w)
    os.set_blocking(to_w, False)
    os.set_blocking(from_r, False)
    return child, to_w, from_r


class Worker:
    """One worker process and its two pipe ends (the agent's side)."""

    def __init__(self, n: int, child: Child, to_fd: int, from_fd: int) -> None:
        self.n = n
        self.child = child
        self.to_fd = to_fd
        self.from_fd = from_fd
        self.buf = bytearray()
        self.units = 0

    def send(self, obj: Any, deadline: float | None) -> None:
        body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(HEADER.pack(len(body)) + body)
        while view:
            try:
                view = view[os.write(self.to_fd, view):]
            except BlockingIOError:
                wait_write(self.to_fd, timeout=_left(deadline))
            except BrokenPipeError:
                raise WorkerGone() from None

    def frame(self, deadline: float | None) -> Any:
        """The next frame; raises WorkerGone at EOF, TimeoutError past ``deadline``."""
        while True:
            if len(self.buf) >= HEADER.size:
                (size,) = HEADER.unpack_from(self.buf)
                if size > MAX_FRAME:
                    raise WorkerGone()
                if len(self.buf) >= HEADER.size + size:
                    body = bytes(self.buf[HEADER.size:HEADER.size + size])
                    del self.buf[:HEADER.size + size]
                    return pickle.loads(body)
            try:
                chunk = os.read(self.from_fd, 1 << 20)
            except BlockingIOError:
                wait_read(self.from_fd, timeout=_left(deadline))
                continue
            if not chunk:
                raise WorkerGone()
            self.buf += chunk

    def close_pipes(self) -> None:
        for name in ("to_fd", "from_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def kill(self) -> int | None:
        """SIGKILL its process group and reap it (on the loop)."""
        self.close_pipes()
        self.child.kill_group(signal.SIGKILL)
        return self.child.wait(timeout=30)

    def retire(self, grace: float) -> int | None:
        """Close its input: it exits by itself; killed if it does not within ``grace``."""
        self.close_pipes()
        rc = self.child.wait(timeout=grace)
        return rc if rc is not None else self.kill()


def _left(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def died_reason(worker: Worker, rc: int | None) -> str:
    pid = worker.child.pid
    if rc is None:
        return f"its function worker (pid {pid}) stopped answering and was killed"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        why = " (a kill -9, or the kernel's OOM killer)" if -rc == signal.SIGKILL else ""
        return (f"its function worker (pid {pid}) was killed by signal {name}{why} while "
                f"running it; the worker was replaced")
    return (f"its function worker (pid {pid}) exited with code {rc} while running it "
            f"(os._exit, or a crash); the worker was replaced")


class FunctionWorkers:
    """Up to ``count`` workers, started on demand, each running one unit at a time."""

    def __init__(self, pool: IOPool, count: int, sandbox: str, env: dict[str, str],
                 memory_mb: float, log: Any, counters: dict[str, int], nice: int = 0) -> None:
        self.pool = pool
        self.nice = nice  # the pilot's unit_nice: each worker's session gets it (_nice)
        self._nicers: set[Any] = set()  # greenlets still setting a worker's
        self.count = count
        self.sandbox = sandbox
        self.env = env
        self.memory_mb = memory_mb
        self.log = log
        self.counters = counters
        for k in ("workers_started", "workers_recycled", "worker_kills", "worker_deaths",
                  "workers_niced"):
            counters.setdefault(k, 0)
        self.slots = Semaphore(count)
        self.idle: list[Worker] = []
        self.busy: set[Worker] = set()
        self.started = 0
        self.closed = False

    def _worker(self) -> Worker:
        if self.idle:
            return self.idle.pop()
        self.started += 1
        n = self.started
        argv = [sys.executable, "-m", "rpg.agent.worker"]
        log_path = os.path.join(self.sandbox, f"worker.{n}.log")
        child, to_fd, from_fd = self.pool.spawn.run(
            _start, argv, self.sandbox, self.env, log_path, timeout=60,
            keep=lambda r: (r[0].kill_group(signal.SIGKILL), os.close(r[1]), os.close(r[2])))
        self.counters["workers_started"] += 1
        self.log.info("function_worker_started", worker=n, pid=child.pid)
        if self.nice:
            g = gevent.spawn(self._nice, n, child)
            self._nicers.add(g)
            g.link(self._nicers.discard)
        return Worker(n, child, to_fd, from_fd)

    def _nice(self, n: int, child: Child) -> None:
        """The worker's session (one of its own) at the pilot's ``unit_nice``, as the units'
        session is (rpg/agent/spawn_server.py): a function unit's CPU must not outweigh the
        loops more than an executable unit's does. Written from here while the worker is
        unreaped (so its pid is its own), and tried again while the kernel's machine-wide rate
        limit (one change per 100 ms) refuses it; the worker serves units meanwhile."""
        path = f"/proc/{child.pid}/autogroup"
        for _ in range(NICE_TRIES):
            if child.returncode is not None or self.closed:
                return
            try:
                self.pool.spawn.run(set_autogroup_nice, self.nice, path, timeout=5)
            except IOPoolError as exc:  # the lane timed out, is closing or stuck
                self.log.warning("function_worker_nice_not_set", worker=n, error=str(exc))
                return
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    gevent.sleep(NICE_RETRY_S)
                    continue
                self.log.warning("function_worker_nice_not_set", worker=n,
                                 error=nice_problem(exc, path))
                return
            self.counters["workers_niced"] += 1
            self.log.info("function_worker_niced", worker=n, nice=self.nice)
            return
        self.log.warning("function_worker_nice_not_set", worker=n,
                         error=f"{path}: the kernel refused it {NICE_TRIES} times (EAGAIN)")

    def run(self, uid: str, payload: bytes, ncalls: int, sandbox: str, env: dict[str, str],
            timeout: float | None, on_start: Any) -> tuple[list[list[Any]], str | None]:
        """Run a unit's calls; returns (results, problem). ``problem`` is None, or why the
        unit could not finish (its worker died, or it timed out): the call running then is
        DIED and the ones after it NOT_RUN. A GreenletExit (cancel) kills the worker."""
        if self.closed:
            raise WorkerGone()
        self.slots.acquire()
        worker = None
        finished = False
        results: list[list[Any]] = []
        try:
            worker = self._worker()
            self.busy.add(worker)
            started = time.monotonic()
            deadline = None if timeout is None else started + timeout
            problem = None
            try:
                worker.send((uid, sandbox, env, payload), deadline)
                on_start()
                while True:
                    fr = worker.frame(deadline)
                    if fr[0] == "e":
                        finished = True
                        worker.units += 1
                        if fr[2] > self.memory_mb:
                            self.log.info("function_worker_recycled", worker=worker.n,
                                          rss_mb=round(fr[2], 1), limit_mb=self.memory_mb)
                            self.counters["workers_recycled"] += 1
                            finished = False  # retire it below, not back to idle
                            self.busy.discard(worker)
                            worker.retire(grace=5.0)
                            worker = None
                        break
                    _, _, index, status, data, path, text, seconds = fr
                    if path is not None:
                        data = self.pool.for_path(path).run(_take_file, path, timeout=120)
                    if index < 0:  # the payload could not be read: no call ran
                        results = [[calls.ERROR, None, text, 0.0]] * max(ncalls, 1)
                        continue
                    results.append([status, data, text, seconds])
            except TimeoutError as exc:  # gevent's socket.timeout is one too
                if isinstance(exc, IOPoolError):  # a result file's read, not the unit's time
                    raise
                self.counters["worker_kills"] += 1
                worker.kill()
                problem = (f"timed out after {timeout:g} s; its function worker (pid "
                           f"{worker.child.pid}) was killed and replaced")
            except WorkerGone:
                self.counters["worker_deaths"] += 1
                rc = worker.kill()
                problem = died_reason(worker, rc)
                self.log.warning("function_worker_died", worker=worker.n, unit=uid,
                                 exit_code=rc)
            if problem is not None:
                spent = time.monotonic() - started
                results.append([calls.DIED, None, problem, spent])
                results += [[calls.NOT_RUN, None, "not started", 0.0]] * (ncalls - len(results))
            return results, problem
        finally:
            try:
                if worker is not None:
                    self.busy.discard(worker)
                    if finished and not self.closed:
                        self.idle.append(worker)
                    else:
                        worker.kill()  # canceled mid-call, or died: a new one takes its place
            finally:  # a second kill during that kill must not take the slot with it
                self.slots.release()

    def close(self) -> None:
        """End every worker (the pilot ends): idle ones exit at EOF, busy ones are killed."""
        self.closed = True
        gevent.killall(list(self._nicers))
        for w in list(self.busy):
            w.kill()
        idle, self.idle = self.idle, []
        for w in idle:
            w.close_pipes()
        for w in idle:
            if w.child.wait(timeout=2.0) is None:
                w.kill()



def function_outcome(desc: dict, results: list, problem: str | None
                     ) -> tuple[list[str], dict[str, Any]]:
    """What a function unit's end says: why it FAILED (nothing: DONE) and its fields. A single
    call that raised gives its traceback as stderr; a worker death or timeout, ``problem``."""
    why = [problem] if problem else []
    fields: dict[str, Any] = {"results": results}
    if desc.get("function") is not None and results and results[0][0] != calls.OK:
        status, text = results[0][0], results[0][2]
        if status == calls.RAISED:
            last = text.strip().splitlines()[-1] if text.strip() else "an exception"
            fields["stderr"] = text[-65536:]
            why = [f"the function raised {last[:500]}"]
        elif not problem:
            why = [text[:2000]]
    return why, fields


def worker_env(base: dict[str, str], session_uid: str, pilot_uid: str,
               sandbox: str) -> dict[str, str]:
    """A worker's environment: the pilot's, this rpg importable first, and the pilot key the
    sweep finds leftovers by."""
    env = dict(base)
    here = os.path.dirname(os.path.dirname(os.path.abspath(calls.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    env.update(RPG_PILOT_UID=pilot_uid, RPG_PILOT_SANDBOX=sandbox,
               RPG_PILOT_KEY=pilot_key(session_uid, pilot_uid))
    return env
