"""The agent: runs on the pilot's resource, in its own process, on its own gevent loop.

It calls in to the hub, pulls units in batches (long poll), runs each unit's lifecycle (stage
in, get cores, execute, stage out) as a greenlet, or, for a plain executable unit, as a
``PlainUnit`` driven by callbacks (rpg/agent/plain_unit.py), and pushes state updates in
batches, which double as heartbeats. If the hub goes silent past the heartbeat timeout, the
agent kills its units and exits; when its runtime ends it fails the units still running and
exits. Given ``hub_pid`` (a local agent of an embedded hub) it also watches that process through
a pidfd and stops at once when it is gone; without it (a hub service that may restart) it waits
out the heartbeat timeout. Its side of the wire (register, pull, push) is rpg/agent/hub_link.py.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import time
from typing import Any

import gevent
import numpy as np
import zerorpc
from gevent import GreenletExit
from gevent.event import Event
from gevent.socket import wait_read

from rpg import states
from rpg.agent.ending import UnitEnding
from rpg.agent.function_workers import (
    FunctionWorkers,
    function_outcome,
    worker_env,
)
from rpg.agent.hub_link import HubLink, _HubLost, _Rejected
from rpg.agent.plain_unit import (
    FD_SHORT_WAIT_S,
    NoTime,
    PlainUnit,
    UnitFailed,
    exit_problems,
    failure_reason,
    own_files,
)
from rpg.agent.resources import (
    SrunPlacer,
    nodes_from_environment,
    open_fd_count,
    raise_nofile_limit,
)
from rpg.agent.scheduler import Scheduler, format_ids
from rpg.agent.unit_process import (
    FD_SHORT,
    SPAWN_RETRY_S,
    Spawners,
    UnitProcess,
    unit_argv,
)
from rpg.gc_policy import FullCollections
from rpg.internals import route_loop_errors
from rpg.io_pool import Batcher, IOPool, IOPoolError, LoopWatch, SpawnError
from rpg.io_pool.sweep import pilot_key
from rpg.io_pool.tails import read_outputs
from rpg.launch_config import AgentConfig
from rpg.log import SparseWarning, get_logger
from rpg.rpc import no_zero_copy
from rpg.staging import StagingError, carry_out, make_sandbox, stage

EXIT_OK = 0
EXIT_HUB_LOST = 3
EXIT_REJECTED = 4
COLLECT_GATHER_S = 0.002  # outputs read in one lane hand-off per 2 ms, not one per unit
# How long a pull or push waits for its reply. Above the hub's JOURNAL_WAIT_S (a reply waits
# that long at most for a stalled journal disk, rpg/hub/service.py), so that such a push is
# answered, not sent again.
CALL_TIMEOUT_S = 15.0


class Agent(HubLink, UnitEnding):
    """One pilot's agent: its loops, its units' lifecycles (the hub link is HubLink's)."""

    def __init__(self, cfg: AgentConfig, gc_policy: FullCollections | None = None) -> None:
        if cfg.token is None:
            raise ValueError("agent config: no token (token_file was not read)")
        self.cfg = cfg
        self.uid = cfg.pilot_uid
        self.token: str = cfg.token
        self.sandbox = cfg.sandbox
        self.cores = int(cfg.cores)
        self.gpus = int(cfg.gpus)
        self.hb_interval = float(cfg.heartbeat_interval)
        self.hb_timeout = float(cfg.heartbeat_timeout)
        self.staging_timeout = float(cfg.staging_timeout)
        self.kill_grace = float(cfg.kill_grace)
        self.resource_manager = cfg.resource_manager
        self.nodes = cfg.nodes or (
            nodes_from_environment(os.environ, self.cores, self.gpus)
            if self.resource_manager == "slurm"
            else [[socket.gethostname(), self.cores, self.gpus]])
        self.log = get_logger("agent", pilot=self.uid)
        self.units: dict[str, Any] = {}  # uid -> its greenlet or PlainUnit
        self.executing = 0
        self.cancel_reasons: dict[str, tuple[str, str]] = {}
        self.running: dict[str, UnitProcess] = {}  # units whose process runs: its exit ends them
        self.signaled: set[str] = set()  # ... that a cancel sent SIGTERM: they end CANCELED
        self._escalations: set[Any] = set()  # greenlets that SIGKILL what SIGTERM left
        self.done = Event()
        self.hub_gone = Event()  # the process holding the hub died: nobody to report to
        self.stop_info: tuple[str, str, str] | None = None  # (why, unit state, reason)
        self.ends_at: float | None = None  # monotonic: when the pilot's runtime runs out
        self.base_env = dict(os.environ)
        self.base_env.update(cfg.environment)
        self.counters = {"units": 0, "pushes": 0, "updates": 0, "pulls": 0, "fd_waits": 0}
        self.fd_limit: dict[str, int] = {}
        self.gc_policy = gc_policy  # the agent's own process runs its full collections
        self._link_init()

    # -- main ------------------------------------------------------------------------------------

    def run(self) -> int:
        route_loop_errors(gevent.get_hub(), SparseWarning(self.log, "greenlet_failed"))
        self.watch = LoopWatch("agent", busy=lambda: bool(self.units)).start()
        self.pool = IOPool()
        self.sched = Scheduler([(str(n[0]), int(n[1]), int(n[2])) for n in self.nodes])
        self.srun = SrunPlacer(self.sched) if self.resource_manager == "slurm" else None
        self.spawners = Spawners(self.pool, self.base_env, self.sandbox, self.log,
                                 self.counters, self.done,
                                 lambda why: self.stop("spawner", states.FAILED, why),
                                 nice=int(self.cfg.unit_nice))
        self.collectors: dict[str, Batcher] = {}
        self.preparers: dict[str, Batcher] = {}
        self.workers = FunctionWorkers(
            self.pool, int(self.cfg.function_workers or self.cores), self.sandbox,
            worker_env(self.base_env, self.cfg.session_uid, self.uid, self.sandbox),
            float(self.cfg.function_worker_memory), self.log, self.counters,
            nice=int(self.cfg.unit_nice))
        ctx = self.ctx = zerorpc.Context()
        # A silent hub is noticed within hb_timeout, and a call to a hub that restarted gives
        # up within CALL_TIMEOUT_S (then the next one reaches the new hub). That bound was
        # zerorpc's per-call heartbeat (lost after 2 x 5 s): a greenlet and a timer more per
        # call, 30-50 us of CPU of a call's 530-580 (docs/performance.md, stop 37).
        timeout = self.call_timeout = max(1.0, min(self.hb_timeout, CALL_TIMEOUT_S))
        self.rpc_pull = zerorpc.Client(context=ctx, timeout=timeout, heartbeat=None)
        self.rpc_push = zerorpc.Client(context=ctx, timeout=timeout, heartbeat=None)
        no_zero_copy(self.rpc_pull)
        no_zero_copy(self.rpc_push)
        self.rpc_pull.connect(self.cfg.hub_address)
        self.rpc_push.connect(self.cfg.hub_address)
        loops: list[Any] = []
        pusher_loop: Any = None
        pusher: Any = None  # the final push
        final_pushed = False  # the orderly end: the stop's reports went in the final push
        code = EXIT_OK
        try:
            self._raise_fd_limit()  # after connect: counts what zmq holds too
            self.spawners.start()
            if self.cfg.hub_pid is not None:
                loops.append(self._watch_hub(self.cfg.hub_pid))
            registering = gevent.spawn(self._register)
            gevent.wait([registering, self.done], count=1)
            if not registering.ready():  # the hub's process went while we called in
                registering.kill()
                raise _HubLost(self.stop_info[2] if self.stop_info else "agent stopped")
            if registering.get() is not None:
                raise registering.value
            puller = gevent.spawn(self._pull_loop)
            pusher_loop = gevent.spawn(self._push_loop)
            loops += [puller, pusher_loop]
            if self.gc_policy is not None:
                loops.append(gevent.spawn(self._full_collections, self.gc_policy))
            runtime = float(self.cfg.runtime_s or 0)
            if runtime > 0:
                self.ends_at = time.monotonic() + runtime
                loops.append(gevent.spawn_later(
                    runtime, self.stop, "runtime", states.FAILED,
                    f"pilot walltime: its runtime of {runtime:g} s ran out"))
            for sig in (signal.SIGTERM, signal.SIGINT):
                # Nobody asked for these units to end (the hub says "shutdown" for that): a
                # signal from outside is the resource ending the pilot (a walltime kill, a
                # scancel), so the units that did not finish FAIL.
                gevent.signal_handler(sig, self.stop, "signal", states.FAILED,
                                      f"agent received signal {sig.name} before the unit "
                                      f"finished")
            self.done.wait()
            why, unit_state, reason = self.stop_info or ("?", states.CANCELED, "agent stopped")
            self.log.info("agent_stopping", why=why, units=len(self.units))
            self._stop_units(unit_state, reason)
            if why == "hub_lost" or self.hub_gone.is_set():
                code = EXIT_HUB_LOST
            elif why == "rejected":
                code = EXIT_REJECTED
            else:
                # A pull under way when the stop began may still bring units: they are
                # reported as not started (_start_unit), and the final push must carry that.
                gevent.wait([puller, self.hub_gone], count=1, timeout=self.call_timeout + 1.0)
                pusher = gevent.spawn(self._final_push)
                gevent.wait([pusher, self.hub_gone], count=1)  # the hub may die meanwhile
                pusher.kill(block=True, timeout=1.0)
                if self.hub_gone.is_set() or self.hub_silent:
                    code = EXIT_HUB_LOST
                else:
                    final_pushed = pusher.successful()
        except _Rejected as exc:
            self.log.error("agent_rejected", error=str(exc))
            code = EXIT_REJECTED
        except _HubLost as exc:
            self.log.error("hub_lost", error=str(exc))
            code = EXIT_HUB_LOST
        finally:
            if not final_pushed:
                # No orderly end (a crash, the hub lost or refusing): the hub ends what is left,
                # in its own words (a crash is no cancel); pushing "agent exiting" would not be.
                gevent.killall([g for g in (pusher_loop, pusher) if g is not None], timeout=5)
            self._stop_units(states.CANCELED, "agent exiting")
            # The push loop goes last: its pushes are the heartbeat while the spawners and the
            # workers close (a stalled spawner takes 10 s, the default heartbeat timeout).
            gevent.killall([g for g in loops if g is not pusher_loop] + list(self._escalations),
                           timeout=5)
            self.spawners.close()
            self.workers.close()
            if pusher_loop is not None:
                gevent.killall([pusher_loop], timeout=5)
            self._write_stats(code)
            self.rpc_pull.close()
            self.rpc_push.close()
            # zmq's term() can block for good when the hub vanished mid-call (zerorpc's
            # sockets linger on unsent messages); never on the loop, and never for long: the
            # process is about to exit anyway. With the hub gone, it would only wait.
            if code != EXIT_HUB_LOST:
                try:
                    self.pool.net.run(ctx.destroy, 0, timeout=3.0)
                except IOPoolError as exc:
                    self.log.warning("zmq_context_not_terminated", error=str(exc))
            self.pool.close(wait=2.0)
            self.watch.stop()
        self.log.info("agent_exit", code=code, **self.counters)
        return code

    def _raise_fd_limit(self) -> None:
        """Raise the open-file limit (zmq, function workers, staging use fds; a running unit
        holds none of the agent's: its spawner reports the exit)."""
        before, soft, hard = self.pool.spawn.run(raise_nofile_limit, timeout=10)
        open_now = self.pool.spawn.run(open_fd_count, timeout=10)
        self.fd_limit = {"soft_before": before, "soft": soft, "hard": hard, "open": open_now}
        self.log.info("fd_limit", **self.fd_limit)

    def _watch_hub(self, pid: int) -> Any:
        """Stop as "hub_lost" as soon as the process holding the hub is gone (pidfd readable)."""
        reason = f"the process holding the hub (pid {pid}) is gone"
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.log.error("hub_process_gone", pid=pid)
            self.hub_gone.set()
            self.stop("hub_lost", states.CANCELED, reason)
            return gevent.spawn(lambda: None)
        except OSError as exc:  # no pidfds here (old kernel, seccomp): the heartbeat remains
            self.log.warning("hub_process_not_watched", pid=pid, error=str(exc))
            return gevent.spawn(lambda: None)

        def watch() -> None:
            try:
                wait_read(pidfd)
                self.log.error("hub_process_gone", pid=pid)
                self.hub_gone.set()  # also when a shutdown is under way: stop reporting
                self.stop("hub_lost", states.CANCELED, reason)
            finally:
                os.close(pidfd)

        return gevent.spawn(watch)

    def _full_collections(self, policy: FullCollections) -> None:
        while True:  # the first tick at once: from then on the policy is in charge
            policy.tick(self.counters["units"], len(self.units))
            gevent.sleep(1.0)

    def _write_stats(self, code: int) -> None:
        """Leave the agent's own numbers (loop lag, lanes, peak RSS) in its sandbox."""
        stats = {"exit_code": code, "counters": self.counters, "loop": self.watch.stats(),
                 "fd_limit": self.fd_limit, "unit_nice": self.spawners.niced(),
                 "gc": self.gc_policy.stats() if self.gc_policy is not None else None,
                 "lanes": self.pool.health(),
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        ticks = self.watch.ticks()  # the same ticks as the stats count (no yield between)
        path = os.path.join(self.sandbox, "agent.stats.json")
        ticks_path = os.path.join(self.sandbox, "agent.loop_ticks.npy")  # bench/concurrency.py
        try:
            self.pool.for_path(path).run(_write_json, path, stats, timeout=10)
            self.pool.for_path(ticks_path).run(np.save, ticks_path, ticks, timeout=10)
        except Exception as exc:
            self.log.warning("agent_stats_not_written", error=str(exc))

    def stop(self, why: str, unit_state: str, reason: str) -> None:
        if self.stop_info is None:
            self.stop_info = (why, unit_state, reason)
        self.done.set()

    # -- one unit --------------------------------------------------------------------------------

    def _start_unit(self, uid: str, desc: dict[str, Any]) -> None:
        """Hold the unit (in ``units``) and start it. A plain executable unit (no staging, not
        srun, not a function) runs as a PlainUnit, driven by callbacks
        (rpg/agent/plain_unit.py); any other as a greenlet. One that comes after the stop
        began (in the reply to a pull that was under way) is not started: it is reported as
        such, and the hub may give it to another pilot."""
        if self.done.is_set():
            _, state, reason = self.stop_info or ("?", states.CANCELED, "agent stopped")
            self.cancel_reasons[uid] = (state, reason)
            self.report_ended(uid, False, None)
            del self.cancel_reasons[uid]
            return
        self.counters["units"] += 1
        if (desc.get("payload") is None
                and not desc.get("input_staging") and not desc.get("output_staging")
                and desc.get("launch") != "srun"):
            unit = self.units[uid] = PlainUnit(self, uid, desc)
            unit.begin()  # it may end at once (then it is gone from units already)
            return
        g = self.units[uid] = gevent.spawn(self._unit, uid, desc)
        g.rawlink(lambda g, uid=uid: self._unit_gone(uid, g))

    def _unit(self, uid: str, desc: dict[str, Any]) -> None:
        sandbox = os.path.join(self.sandbox, uid)
        slots = child = None
        extra: list[Any] = []  # a multi-node srun unit's slots on its other nodes
        executing = started = False
        try:
            self.report(uid, states.STAGING_IN, sandbox=sandbox)
            if desc.get("payload") is None:  # its sandbox and output files, batched per disk
                self._preparer(sandbox).call(sandbox, own_files(desc))
            if desc["input_staging"]:
                self._stage(desc["input_staging"], "in", sandbox,
                            create=desc.get("payload") is not None)
            self.report(uid, states.SCHEDULING)
            cores, gpus = int(desc["cores"]), int(desc["gpus"])
            argv = unit_argv(desc)
            if desc.get("launch") == "srun":
                if self.srun is None:
                    raise UnitFailed("launch='srun' needs a pilot on SLURM (resource='slurm')")
                slots, argv = self.srun.place(desc, argv, extra)
            elif not self.sched.fits_ever(cores, gpus):
                raise UnitFailed(f"needs {cores} cores and {gpus} gpus on one node; "
                                  f"the pilot's nodes are smaller")
            else:
                slots = self.sched.allocate(cores, gpus)
            self.check_time(desc)
            self.executing += 1
            executing = started = True
            if desc.get("payload") is not None:
                results, problem = self._call(uid, desc, sandbox, slots)
                self.sched.free(slots)
                slots = None
                self.executing -= 1
                executing = False
                self.report(uid, states.STAGING_OUT)
                why, fields = function_outcome(desc, results, problem)
                self._finish(uid, desc, sandbox, why, fields, stage_out=problem is None)
                return
            env = self._unit_env(uid, sandbox, slots, desc)
            child = self._spawn(argv, sandbox, env, desc)
            self.report(uid, states.EXECUTING)  # the process exists now
            timeout = desc.get("timeout")
            self.running[uid] = child  # a cancel signals it; its exit ends the unit here
            try:
                rc = child.wait(timeout=timeout)
            except SpawnError:
                if uid in self.signaled:  # canceled, and then its spawner died
                    raise GreenletExit from None
                raise
            finally:
                del self.running[uid]  # a cancel from now on kills it where it is
            if uid in self.signaled:  # canceled while it ran: ended as a kill ends it
                raise GreenletExit
            timed_out = rc is None
            if timed_out:
                rc = child.terminate(grace=self.kill_grace)
            self.sched.free(slots)
            slots = None
            while extra:
                self.sched.free(extra.pop())
            self.executing -= 1
            executing = False
            self.report(uid, states.STAGING_OUT)
            out, err, unreadable = self._collector(sandbox).call(sandbox, desc["stdout"],
                                                                 desc["stderr"])
            fields = {"exit_code": rc, "stdout": out, "stderr": err}
            why = exit_problems(rc, timeout if timed_out else None)
            why += unreadable  # never report DONE with output silently missing
            self._finish(uid, desc, sandbox, why, fields, stage_out=not timed_out)
        except GreenletExit:
            rc = self._terminate(child)
            self.report_ended(uid, started, rc)
        except NoTime as exc:  # it did not start: the hub may give it to another pilot
            self.report(uid, states.FAILED, reason=str(exc), reason_code="drained")
        except Exception as exc:  # UnitFailed, StagingError, IOPoolError, SpawnError, OSError,
            # ResourceError, WorkerGone; and anything unforeseen (a batch aborted, a bug): the
            # unit FAILS saying so, never goes unreported (a PlainUnit does the same)
            rc = self._terminate(child)
            self.report(uid, states.FAILED, reason=failure_reason(exc, self.log, uid),
                        exit_code=rc)
        finally:
            if slots is not None:
                self.sched.free(slots)
            while extra:
                self.sched.free(extra.pop())
            if executing:
                self.executing -= 1
            self.units.pop(uid, None)
            self.cancel_reasons.pop(uid, None)
            self.signaled.discard(uid)

    def check_time(self, desc: dict) -> None:
        """Walltime-aware draining: a unit whose runtime estimate would overrun what is left
        of the pilot's runtime does not start here (it may go to a pilot with more time)."""
        runtime = desc.get("runtime")
        if runtime and self.ends_at is not None:
            left = self.ends_at - time.monotonic()
            if runtime > left:
                raise NoTime(f"pilot walltime: its runtime ({runtime:g} s) would overrun the "
                              f"pilot's, which has {max(left, 0.0):.1f} s left")

    def _call(self, uid: str, desc: dict, sandbox: str, slots: Any) -> tuple[list, str | None]:
        """A function unit's calls, in a warm worker (rpg/agent/function_workers.py)."""
        env = {"RPG_UNIT_UID": uid, "RPG_UNIT_SANDBOX": sandbox,
               "RPG_NODE": self.sched.node_names[slots.node],
               "RPG_CORES": format_ids(slots.cores)}
        env.update(desc.get("environment") or {})
        return self.workers.run(uid, desc["payload"], int(desc.get("calls") or 1), sandbox, env,
                                desc.get("timeout"),
                                lambda: self.report(uid, states.EXECUTING))

    def _finish(self, uid: str, desc: dict, sandbox: str, why: list[str],
                fields: dict[str, Any], stage_out: bool) -> None:
        """Stage out (unless the unit did not finish) and report DONE, or FAILED with ``why``."""
        if stage_out and desc["output_staging"]:
            try:
                self._stage(desc["output_staging"], "out", sandbox)
            except StagingError as exc:
                why.append(str(exc))
        if why:
            self.report(uid, states.FAILED, reason="; ".join(why), **fields)
        else:
            self.report(uid, states.DONE, **fields)

    def _spawn(self, argv: list[str], sandbox: str, env: dict[str, str], desc: dict) -> Any:
        """Start the unit; "too many open files" (ours or the system's) waits and retries, it
        does not fail the unit, unless it lasts SPAWN_RETRY_S."""
        deadline = time.monotonic() + SPAWN_RETRY_S
        delay = FD_SHORT_WAIT_S
        while True:
            try:
                return self._spawn_once(argv, sandbox, env, desc)
            except OSError as exc:
                if exc.errno not in FD_SHORT or time.monotonic() > deadline:
                    raise
                self.counters["fd_waits"] += 1
                self.log.warning("spawn_fds_short", error=str(exc)[:200], retry_s=delay)
                gevent.sleep(delay)
                delay = min(1.0, delay * 2)

    def _spawn_once(self, argv: list[str], sandbox: str, env: dict[str, str],
                    desc: dict) -> Any:
        return self.spawners.spawn(env["RPG_UNIT_UID"], argv, sandbox, env,
                                   os.path.join(sandbox, desc["stdout"]),
                                   os.path.join(sandbox, desc["stderr"]))

    def _collector(self, sandbox: str) -> Batcher:
        """Output collection, batched per disk lane."""
        return self._batcher(self.collectors, read_outputs, sandbox, parallel=2)

    def _preparer(self, sandbox: str) -> Batcher:
        """Sandboxes made before the spawn (off the spawner's path), batched per disk lane; one
        batch at a time, so that units go on to their cores in the order they came."""
        return self._batcher(self.preparers, make_sandbox, sandbox, parallel=1)

    def _batcher(self, batchers: dict[str, Batcher], fn: Any, sandbox: str,
                 parallel: int) -> Batcher:
        lane = self.pool.for_path(sandbox)
        b = batchers.get(lane.name)
        if b is None:
            b = batchers[lane.name] = Batcher(lane, fn, max_batch=32, parallel=parallel,
                                              timeout=self.staging_timeout,
                                              gather_s=COLLECT_GATHER_S)
        return b

    def _stage(self, directives: list[dict], direction: str, sandbox: str,
               create: bool = False) -> None:
        """Carry out a unit's directives, each in the lane of the disk its other side is on;
        raises StagingError (rpg.staging decides about non_fatal)."""
        if create:
            self.pool.for_path(sandbox).run(make_sandbox, sandbox, timeout=self.staging_timeout)

        def one(d: dict) -> None:
            outer = d["source"] if direction == "in" else d["target"]
            lane = self.pool.for_path(outer if outer.startswith("/") else sandbox)
            lane.run(stage, d, direction, sandbox, self.sandbox, timeout=self.staging_timeout)

        carry_out(directives, one, f"staging {direction}", self.log,
                  unit=os.path.basename(sandbox))

    def _unit_env(self, uid: str, sandbox: str, slots: Any, desc: dict) -> dict[str, str]:
        """What the unit's environment adds to the agent's (the spawner has that one)."""
        env = dict(desc.get("environment") or {})
        env.update({
            "RPG_UNIT_UID": uid,
            "RPG_PILOT_UID": self.uid,
            "RPG_PILOT_KEY": pilot_key(self.cfg.session_uid, self.uid),
            "RPG_UNIT_SANDBOX": sandbox,
            "RPG_PILOT_SANDBOX": self.sandbox,
            "RPG_NODE": self.sched.node_names[slots.node],
            "RPG_CORES": format_ids(slots.cores),  # ranges: "0-3,8"
        })
        if len(slots.gpus):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slots.gpus.tolist()))
        return env


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)

