"""A plain executable unit's lifecycle, driven by callbacks: no greenlet of its own.

Most units are an executable with no staging and no ``srun`` (the many small tasks rpg is
for). ``Agent._unit`` runs a unit as a greenlet: one made and freed per unit (its frame
stack mapped and unmapped) and five waits, each a switch into it and back. ``PlainUnit`` takes
the same steps, with the same reports in the same order and the same outcomes, as callbacks on
what each step waits for: its sandbox made (a ``Batcher`` result), its cores (a place in the
scheduler's line), its start and its exit (the spawner's replies), its outputs read. Any other
unit (staging, srun, a function) keeps its greenlet. A timeout is a timer of the loop's: when
it runs out, the process gets SIGTERM, then SIGKILL after ``kill_grace``, and the unit FAILS
("timed out after ... s; killed") once its exit is seen.

Cancel: ``kill()``, the call ``Agent.cancel_unit``, ``escalate_later`` and ``_stop_units`` make
on a unit's greenlet, ends it where it is, as GreenletExit ends ``Agent._unit``: a unit not
started yet leaves the line (or takes back its call, or has its start killed) and is reported
at once; one whose process runs gets SIGTERM, SIGKILL after ``kill_grace``, and is reported
when its exit is seen (or after KILL_WAIT_S more). Every step is one callback that runs to its
end with no wait inside it, so a kill never lands in the middle of a step, and each callback
first checks that the unit is still live (a reply that comes after a cancel changes nothing).
A ``PlainUnit`` speaks gevent's wait protocol (``rawlink``, ``unlink``), so ``gevent.joinall``
waits for it as for a greenlet.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

import gevent

from rpg import states
from rpg.agent.function_workers import WorkerGone
from rpg.agent.resources import ResourceError
from rpg.agent.scheduler import Slots
from rpg.agent.unit_process import (
    FD_SHORT,
    KILL_WAIT_S,
    NO_SPAWNER_RETRY_S,
    SPAWN_RETRY_S,
    SPAWN_TIMEOUT_S,
    no_spawner,
    start_error,
    start_timed_out,
    unit_argv,
)
from rpg.io_pool import IOPoolError
from rpg.staging import StagingError

if TYPE_CHECKING:
    from rpg.agent.agent import Agent

FD_SHORT_WAIT_S = 0.05  # a spawn short of fds tries again after this, doubling up to 1 s


class UnitFailed(Exception):
    pass


class NoTime(Exception):
    """A unit's runtime would overrun the pilot's: it is not started."""


# What a unit's steps raise by design; their words are the unit's reason as they are.
EXPECTED = (UnitFailed, NoTime, StagingError, IOPoolError, OSError, ResourceError, WorkerGone)


def failure_reason(exc: BaseException, log: Any, uid: str) -> str:
    """A failed unit's reason: an expected error's own words; an unforeseen one (a bug) also
    its type, and its traceback in the agent's log."""
    if isinstance(exc, EXPECTED):
        return str(exc)
    log.error("unit_step_failed", unit=uid, error=repr(exc)[:300],
              traceback="".join(traceback.format_exception(exc))[-4000:])
    return f"{type(exc).__name__}: {exc}"


def exit_problems(rc: int | None, timed_out_after: float | None = None) -> list[str]:
    """Why a unit whose process ended did not succeed (empty: it did), for both paths."""
    if timed_out_after is not None:
        return [f"timed out after {timed_out_after:g} s; killed"]
    if rc == 0:
        return []
    return [f"exit code {rc}" if rc > 0 else f"killed by signal {-rc}"]


def own_files(desc: dict[str, Any]) -> tuple[str, ...]:
    """The unit's stdout and stderr names that are files directly in its sandbox."""
    return tuple(n for n in (desc["stdout"], desc["stderr"]) if n and "/" not in n)


class PlainUnit:
    """One plain executable unit on its way through the agent (see the module's doc)."""

    __slots__ = ("agent", "uid", "desc", "sandbox", "argv", "slots", "proc", "waiting", "batcher",
                 "timer", "started", "executing", "killed", "timed_out", "collecting", "dead",
                 "links", "spawn_deadline", "fd_deadline", "fd_delay", "rc")

    def __init__(self, agent: Agent, uid: str, desc: dict[str, Any]) -> None:
        self.agent = agent
        self.uid = uid
        self.desc = desc
        self.sandbox = os.path.join(agent.sandbox, uid)
        self.argv: list[str] = []
        self.slots: Slots | None = None
        self.proc: Any = None  # its UnitProcess, from the start's request on
        self.waiting: Any = None  # the AsyncResult or scheduler waiter it waits for
        self.batcher: Any = None  # the Batcher that ``waiting`` is a call of
        self.timer: Any = None  # a pending timeout or retry of the loop's
        self.started = False  # it got its cores: its process is, or is about to be, running
        self.executing = False  # ... and counts in the agent's ``executing`` until it exits
        self.killed = False  # kill() sent SIGTERM to its running process
        self.timed_out = False  # its timeout ran out: its process is being ended
        self.collecting = False  # its process has ended (or was given up on): outputs next
        self.dead = False  # reported final; every callback that comes later is ignored
        self.links: list[Callable[[Any], None]] | None = None
        self.spawn_deadline = 0.0
        self.fd_deadline = 0.0
        self.fd_delay = FD_SHORT_WAIT_S
        self.rc: int | None = None

    # -- the steps, each one callback --------------------------------------------------------

    def begin(self) -> "PlainUnit":
        a = self.agent
        try:
            a.report(self.uid, states.STAGING_IN, sandbox=self.sandbox)
            self._call(a._preparer(self.sandbox), self._prepared, self.sandbox,
                       own_files(self.desc))
        except Exception as exc:
            self._failed(exc)
        return self

    def _prepared(self, result: Any) -> None:
        if self.dead:
            return
        self.waiting = self.batcher = None
        a, desc = self.agent, self.desc
        try:
            if not result.successful():
                raise result.exception
            a.report(self.uid, states.SCHEDULING)
            self.argv = unit_argv(desc)
            cores, gpus = int(desc["cores"]), int(desc["gpus"])
            if not a.sched.fits_ever(cores, gpus):
                raise UnitFailed(f"needs {cores} cores and {gpus} gpus on one node; "
                                 f"the pilot's nodes are smaller")
            got = a.sched.request(cores, gpus)
            if isinstance(got, Slots):
                self._run(got)
            else:
                self.waiting = got
                got[2].rawlink(self._granted)
        except Exception as exc:
            self._failed(exc)

    def _granted(self, result: Any) -> None:
        if self.dead:  # it left the line (kill): cores granted meanwhile went back there
            return
        self.waiting = None
        try:
            self._run(result.value)
        except Exception as exc:
            self._failed(exc)

    def _run(self, slots: Slots) -> None:
        a = self.agent
        self.slots = slots
        a.check_time(self.desc)
        a.executing += 1
        self.started = self.executing = True
        now = time.monotonic()
        self.spawn_deadline = now + SPAWN_TIMEOUT_S
        self.fd_deadline = now + SPAWN_RETRY_S
        self._spawn()

    def _spawn(self) -> None:
        self._stop_timer()
        if self.dead:
            return
        a, desc, uid = self.agent, self.desc, self.uid
        spawner = a.spawners.next()
        if spawner is None:  # the dead one is being replaced: look again soon
            if time.monotonic() > self.spawn_deadline:
                raise no_spawner()
            self._later(NO_SPAWNER_RETRY_S, self._respawn)
            return
        env = a._unit_env(uid, self.sandbox, self.slots, desc)
        self.proc = spawner.request(uid, self.argv, self.sandbox, env,
                                    os.path.join(self.sandbox, desc["stdout"]),
                                    os.path.join(self.sandbox, desc["stderr"]))
        self._later(SPAWN_TIMEOUT_S, self._start_timed_out)
        self.proc._started.rawlink(self._answered)

    def _respawn(self) -> None:
        try:
            self._spawn()
        except Exception as exc:
            self._failed(exc)

    def _start_timed_out(self) -> None:
        if self.dead:
            return
        self.proc.signal_group(signal.SIGKILL)
        self._failed(start_timed_out(self.argv, SPAWN_TIMEOUT_S))

    def _answered(self, _event: Any) -> None:
        if self.dead:
            return
        self._stop_timer()
        a, proc = self.agent, self.proc
        try:
            if proc.error is not None:
                exc = start_error(proc, self.argv)
                self.proc = None
                if exc.errno in FD_SHORT and time.monotonic() <= self.fd_deadline:
                    a.counters["fd_waits"] += 1  # too many open files: wait and retry
                    a.log.warning("spawn_fds_short", error=str(exc)[:200], retry_s=self.fd_delay)
                    self.spawn_deadline = time.monotonic() + SPAWN_TIMEOUT_S
                    self._later(self.fd_delay, self._respawn)
                    self.fd_delay = min(1.0, self.fd_delay * 2)
                    return
                raise exc
            a.report(self.uid, states.EXECUTING)  # the process exists now
            if proc._exited.is_set():  # its exit came in the same frame: no cancel between
                self._exited(None)
                return
            a.running[self.uid] = proc  # a cancel signals it; its exit ends the unit
            proc._exited.rawlink(self._exited)
            timeout = self.desc.get("timeout")
            if timeout is not None:
                self._later(timeout, self._timed_out)
        except Exception as exc:
            self._failed(exc)

    def _timed_out(self) -> None:
        """Its timeout ran out: SIGTERM, SIGKILL after ``kill_grace``; it FAILS once its exit
        is seen (or after KILL_WAIT_S more), as a greenlet's ``terminate`` ends it."""
        proc = self.proc
        if self.dead or self.collecting or proc.returncode is not None or proc.error is not None:
            return  # its exit (or its spawner's death) came first: _exited, queued, ends it
        self.agent.running.pop(self.uid, None)  # a cancel from now on is a kill, as for a greenlet
        if self.uid in self.agent.signaled:  # canceled before: it ends as a kill ends it
            self.killed = True
            proc.signal_group(signal.SIGTERM)
            self._later(self.agent.kill_grace, self._kill_hard)
            return
        self.timed_out = True
        proc.signal_group(signal.SIGTERM)
        self._later(self.agent.kill_grace, self._timeout_kill)

    def _timeout_kill(self) -> None:
        if self.dead or self.collecting:
            return
        self.proc.signal_group(signal.SIGKILL)
        self._later(KILL_WAIT_S, self._gave_up)

    def _gave_up(self) -> None:
        """SIGKILL had KILL_WAIT_S and no exit came: it ends with no exit code seen (as a
        greenlet's ``terminate`` returns None)."""
        if not (self.dead or self.collecting):
            self._after_exit(self.proc.returncode)

    def _exited(self, _event: Any) -> None:
        if self.dead or self.collecting:
            return
        a, proc, uid = self.agent, self.proc, self.uid
        try:
            a.running.pop(uid, None)
            self._stop_timer()
            if uid in a.signaled or self.killed:  # canceled while it ran (or its spawner died)
                self._ended(proc.returncode)
                return
            if proc.error is not None and not self.timed_out:  # the spawner died under it
                self._failed(proc.error)
                return
            self._after_exit(proc.returncode)
        except Exception as exc:
            self._failed(exc)

    def _after_exit(self, rc: int | None) -> None:
        """Its process is gone (``rc`` None: not seen to exit): cores back, outputs read."""
        self.collecting = True
        self.rc = rc
        self._release()
        self.agent.report(self.uid, states.STAGING_OUT)
        self._call(self.agent._collector(self.sandbox), self._collected, self.sandbox,
                   self.desc["stdout"], self.desc["stderr"])

    def _collected(self, result: Any) -> None:
        if self.dead:
            return
        self.waiting = self.batcher = None
        try:
            if not result.successful():
                raise result.exception
            out, err, unreadable = result.value
            rc = self.rc
            fields = {"exit_code": rc, "stdout": out, "stderr": err}
            why = exit_problems(rc, self.desc["timeout"] if self.timed_out else None)
            why += unreadable  # never report DONE with output silently missing
            if why:
                self._end(states.FAILED, reason="; ".join(why), **fields)
            else:
                self._end(states.DONE, **fields)
        except Exception as exc:
            self._failed(exc)

    # -- cancel --------------------------------------------------------------------------------

    def kill(self, block: bool = False) -> None:
        """End it where it is, as a cancel (the reason is the agent's ``cancel_reasons``)."""
        if self.dead:
            return
        proc = self.proc
        if proc is not None and not self.collecting and (
                self.uid in self.agent.running or self.timed_out):  # its process runs
            if self.killed:  # a second kill: its exit has not come; it ends here, unseen
                proc.signal_group(signal.SIGKILL)
                self._ended(None)
                return
            self.killed = True
            self._stop_timer()
            proc.signal_group(signal.SIGTERM)
            self._later(self.agent.kill_grace, self._kill_hard)
            return
        if isinstance(self.waiting, list):
            self.agent.sched.leave(self.waiting)
        elif self.waiting is not None and self.batcher is not None:
            self.batcher.withdraw(self.waiting)  # a batch that took it already runs it anyway
        if proc is not None:  # asked for, not yet started: the start is killed behind it
            proc.signal_group(signal.SIGKILL)
        self._ended(self.rc)

    def _kill_hard(self) -> None:
        if self.dead:
            return
        self.proc.signal_group(signal.SIGKILL)
        self._later(KILL_WAIT_S, self._ended, None)

    # -- gevent's wait protocol (gevent.joinall, gevent.wait) ------------------------------------

    def rawlink(self, callback: Callable[[Any], None]) -> None:
        if self.dead:
            gevent.get_hub().loop.run_callback(callback, self)
        elif self.links is None:
            self.links = [callback]
        else:
            self.links.append(callback)

    def unlink(self, callback: Callable[[Any], None]) -> None:
        if self.links is not None:
            try:
                self.links.remove(callback)
            except ValueError:
                pass

    def ready(self) -> bool:
        return self.dead

    # -- its end -------------------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        if self.dead:
            return
        if isinstance(exc, NoTime):  # it did not start: the hub may give it to another pilot
            self._end(states.FAILED, reason=str(exc), reason_code="drained")
        else:
            self._end(states.FAILED, reason=failure_reason(exc, self.agent.log, self.uid),
                      exit_code=self.rc)

    def _ended(self, rc: int | None) -> None:
        if self.dead:
            return
        self.agent.report_ended(self.uid, self.started, rc)
        self._close()

    def _end(self, state: str, **fields: Any) -> None:
        self.agent.report(self.uid, state, **fields)
        self._close()

    def _close(self) -> None:
        a, uid = self.agent, self.uid
        self.dead = True
        self._stop_timer()
        self._release()
        a.running.pop(uid, None)
        a.units.pop(uid, None)
        a.cancel_reasons.pop(uid, None)
        a.signaled.discard(uid)
        links, self.links = self.links, None
        if links:  # from the hub, as gevent calls a greenlet's links (joinall's must be)
            run = gevent.get_hub().loop.run_callback
            for callback in links:
                run(callback, self)

    def _release(self) -> None:
        if self.slots is not None:
            self.agent.sched.free(self.slots)
            self.slots = None
        if self.executing:
            self.executing = False
            self.agent.executing -= 1

    def _call(self, batcher: Any, then: Callable[[Any], None], *args: Any) -> None:
        self.batcher = batcher
        self.waiting = batcher.submit(*args)
        self.waiting.rawlink(then)

    def _later(self, seconds: float, fn: Callable[..., None], *args: Any) -> None:
        self._stop_timer()
        self.timer = gevent.get_hub().loop.timer(seconds)
        self.timer.start(self._fire, fn, *args)

    def _fire(self, fn: Callable[..., None], *args: Any) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.close()
        try:
            fn(*args)
        except Exception as exc:
            self._failed(exc)

    def _stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.stop()
            timer.close()
