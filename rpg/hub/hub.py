"""The hub of one session: a gevent loop with every pilot lifecycle as a greenlet, and every
unit a record that the binding's queues, the agents' pulls and pushes move on.

An embedded hub runs on a native thread of its own. The hubs of a hub service all run on the
service's loop (``host``): one loop, so that ten sessions' loops do not wait on each other for
the GIL. The application thread never touches hub state: it posts calls onto the hub loop
(``loop.run_callback_threadsafe``) and reads the session's event stream (rpg/hub/events.py).
Everything blocking (disk, spawn, network) goes to the hub's IOPool.
"""

from __future__ import annotations

import itertools
import os
import posixpath
import secrets
import time
from typing import Any, Callable

import gevent
import zerorpc
from gevent.event import Event

from rpg import gc_policy, states, threads
from rpg.hub.binding import Binding
from rpg.hub.events import EventLog
from rpg.hub.lifecycle import ClientStagingSteps, PilotLifecycle
from rpg.hub.moves import Moves
from rpg.hub.records import Ledger, PilotRecord, UnitRecord
from rpg.hub.service import HubService, require
from rpg.internals import bound_address, route_loop_errors
from rpg.io_pool import IOPool, LoopWatch, yield_to_loop
from rpg.log import ProfileWriter, SparseWarning, get_logger
from rpg.rpc import no_zero_copy, wire_problem
from rpg.sandbox import SandboxError, make_private_dir
from rpg.states import Why

PROFILE_FLUSH_S = 0.2
CANCEL_WORDS = {Why.CANCELED: "canceled by the application", Why.SESSION_CLOSED: "session closed",
                Why.HUB_STOPPED: "hub stopped"}
SUBMIT_SLICE = 500  # units a submit takes per slice (yield_to_loop): 20,000 at once held it 0.45 s
# Units a cancel takes per slice (yield_to_loop): while thousands of processes die at once, a
# slice of the loop's CPU takes about ten times as long in wall time (the cores are full).
CANCEL_SLICE = 100
CLOSE_FORCE_S = 60.0  # past the graceful timeout: killing agents and units, reaping them
GC_TICK_S = 1.0  # how often the hub ticks the process's collection policy (rpg.gc_policy)


class HubError(RuntimeError):
    """The hub could not start, or was used after close."""


class Hub:
    """Owns the hub thread. Public methods are called from application threads."""

    def __init__(self, session_uid: str, sandbox: str, address: str, events: EventLog,
                 host: Any = None, dashboard: str | None = None) -> None:
        if not address.startswith("tcp://"):
            raise HubError(f"hub_address must be tcp://host:port, got {address!r}")
        self.session_uid = session_uid
        self.sandbox = sandbox
        self.requested_address = address
        self.address: str | None = None
        self.events = events
        self.profile = ProfileWriter(os.path.join(sandbox, "profile.jsonl"))
        self.ledger = Ledger(self.profile, events)  # the one place records change state
        self.units = self.ledger.units
        self.pilots = self.ledger.pilots
        self.binding = Binding(self.pilots, self._no_pilot)
        self.ledger.released = self.binding.released
        self.moves = Moves(self)  # where a unit goes after a bad end (retries, walltime, ...)
        self.ledger.retry = self.moves.retry
        self.managers: dict[str, str] = {}  # uid -> "pilot" | "unit"
        # What launchers share between the pilots of this hub, by kind: SSH connections per
        # user@host (launchers/ssh/hosts.py), SLURM clusters (launchers/slurm.py). Hub loop only.
        self.shared: dict[str, Any] = {}
        self._uids = itertools.count()  # next() is atomic: uids are taken from any thread
        # Accepted, not yet made into records (a big submit is taken in slices): uid -> [umgr,
        # cancel reason or None], so a cancel that arrives meanwhile reaches them too.
        self.pending_units: dict[str, list[Any]] = {}
        self._submitters: set[Any] = set()
        # host: the service's (loop, LoopWatch) to run on; None: a thread and loop of its own
        self._host = host
        self._thread = (threads.Thread(loop_thread_target(self._main), f"rpg-hub-{session_uid}")
                        if host is None else None)
        self._ready = threads.Reply()  # waited on cooperatively where the waiter runs a loop
        self._done = threads.Reply()
        self._post_lock = threads.Lock()
        self._start_error: BaseException | None = None
        self._stop: Event | None = None
        self.loop: Any = None
        self.pool: IOPool | None = None
        self.watch: LoopWatch | None = None
        self.service: HubService | None = None
        # A hub service's session: its journal (rpg/hub/journal.py), and what a restart read
        # back from it (rpg/hub/restore.py) until the hub runs again.
        self.journal: Any = None
        self.restored: Any = None
        self.closed = False
        self._close_by: float | None = None
        self._close_why = Why.SESSION_CLOSED
        # An embedded hub dies with the application: its local agents end their units at once
        # when its process is gone, instead of waiting out heartbeat_timeout.
        self.agents_follow_hub_process = True
        self.log = get_logger("hub", session=session_uid)
        # The live dashboard of an embedded session (rpg/dashboard): its address, then the
        # server, and the URL with the session's own random token.
        self._dashboard_address = dashboard
        self.dashboard: Any = None
        self.dashboard_url: str | None = None

    def open_journal(self, good: int | None = None) -> Any:
        """A hub service's session journals itself (rpg/hub/journal.py): every event of its
        stream goes into the journal, and readers see it once written. On the loop, after
        start. ``good``: a restored journal's readable length (a torn tail is cut there)."""
        from rpg.hub.journal import JOURNAL, Journal

        path = os.path.join(self.sandbox, JOURNAL)
        assert self.pool is not None
        journal = Journal(path, self.pool.for_path(path), good=good,
                          on_written=self.events.release)
        journal.mark = lambda: len(self.events)
        self.journal = journal
        self.events.journal = journal
        return journal

    def holds_work(self) -> bool:
        """Units submitted and not final yet (the loop-lag ticker rests while there are none)."""
        ledger = self.ledger
        return bool(self.pending_units) or len(ledger.units) > ledger.units_final

    def next_uid(self, prefix: str) -> str:
        """A new uid of this session (``unit.000042``); safe from any thread."""
        return f"{prefix}.{next(self._uids):06d}"

    # -- thread and loop -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._thread.start()
        else:
            self._host[0].run_callback_threadsafe(gevent.spawn, self._main)
        if not self._ready.wait(timeout):
            raise HubError(f"hub did not start within {timeout} s")
        if self._start_error is not None:
            if self._thread is not None:
                self._thread.join(5)
            else:
                self._done.wait(5)
            raise HubError(f"hub failed to start: {self._start_error}") from self._start_error

    def _main(self) -> None:
        """The hub's work, in a greenlet of its loop (see loop_thread_target)."""
        self.loop = gevent.get_hub().loop
        ctx = server = server_g = flusher = collector = None
        try:
            self._stop = Event()
            self.watch = (LoopWatch("hub", busy=self.holds_work).start() if self._host is None
                          else self._host[1])
            self.pool = IOPool()
            if self.restored is None:  # a restored session's sandbox is its own already
                self.pool.for_path(self.sandbox).run(_make_session_sandbox, self.sandbox,
                                                     self.profile.path, timeout=30)
            ctx = zerorpc.Context()
            self.service = HubService(self)
            server = zerorpc.Server(self.service, context=ctx, heartbeat=5)
            no_zero_copy(server)
            endpoint = self.requested_address
            host, _, port = endpoint[len("tcp://"):].rpartition(":")
            if host not in ("127.0.0.1", "localhost", "[::1]"):
                self.log.warning("hub_binds_non_loopback", address=endpoint)
            if port in ("0", ""):
                endpoint = f"tcp://{host}:*"
            server.bind(endpoint)
            self.address = bound_address(server)
            server_g = gevent.spawn(server.run)
            flusher = gevent.spawn(self._flush_loop)
            collector = gevent.spawn(self._collections_loop)
            if self._dashboard_address is not None:
                self._start_dashboard(self._dashboard_address)
            self.log.info("hub_started", address=self.address, sandbox=self.sandbox)
        except BaseException as exc:  # report to start(), then clean up below
            self._start_error = exc
        finally:
            self._ready.set()
            if self.closed and self._stop is not None:
                self._stop.set()  # a close that came before we were ready scheduled nothing
        try:
            if self._start_error is None:
                self._stop.wait()
                self._shutdown()
        finally:
            if self.dashboard is not None:
                self.dashboard.stop()
            for g in (collector, flusher, server_g):
                if g is not None:
                    g.kill(block=True, timeout=2)
            if server is not None:
                server.close()
            if ctx is not None:
                if self._host is None or self.pool is None:
                    ctx.destroy(linger=0)
                else:  # zmq's term() blocks in C: not on a loop every session shares
                    try:
                        self.pool.net.run(ctx.destroy, 0, timeout=5.0)
                    except Exception as exc:
                        self.log.warning("zmq_context_not_terminated", error=str(exc))
            try:
                if self.pool is not None and self.journal is not None:
                    # Every final state in the file, then the end: a session closed (or ended
                    # by the service's stop) is not brought back by a restart.
                    self.journal.add("closed")
                    self.journal.close()
                if self.pool is not None:
                    try:
                        self._flush_profile()
                    except Exception as exc:  # a full disk: say what is lost, close anyway
                        self.log.error("profile_not_flushed_at_close", error=str(exc),
                                       events_lost=self.profile.pending())
                    self.pool.close(wait=2.0)  # logs any thread left stuck
            finally:
                if self.watch is not None and self._host is None:
                    self.watch.stop()
                self.events.close()  # the stream's end: every final state is in it
                self._done.set()

    def _start_dashboard(self, address: str) -> None:
        from rpg.dashboard import Dashboard, DashboardError, token_matches

        token = secrets.token_urlsafe(24)
        board = Dashboard(address, lambda t: [self] if token_matches(t, token) else None,
                          lambda: [self], self.session_uid)
        try:
            board.start()
        except DashboardError as exc:
            raise HubError(str(exc)) from None
        self.dashboard = board
        self.dashboard_url = board.url(token)

    def read_output(self, uid: str, name: str, offset: int, limit: int) -> dict[str, Any]:
        """Up to ``limit`` bytes of a unit's sandbox file ``name`` from ``offset`` (hub loop):
        read where the hub reaches the sandbox, in a lane (the file's disk lane here, SFTP for
        a pilot on another machine). ``eof``: the unit had ended before the read, and nothing
        more is there. Raises ProtocolError naming the problem."""
        from rpg.hub.output import read_unit_file, unit_file_path

        unit = self.units.get(uid)
        require(unit is not None, f"no unit {uid!r} in session {self.session_uid}")
        ended = states.is_final(unit.state)  # before the read: what it wrote is all there
        pilot = self.pilots.get(unit.pilot) if unit.pilot else None
        reply = {"data": b"", "offset": offset, "state": unit.state, "eof": ended}
        if pilot is None or pilot.sandbox is None or pilot.launcher is None:
            return reply  # not bound yet (or never was): nothing written
        path = unit_file_path(unit.sandbox or posixpath.join(pilot.sandbox, uid), name)
        data = read_unit_file(self, pilot.launcher, path, offset, limit)
        reply.update(data=data, offset=offset + len(data), eof=ended and len(data) < limit)
        return reply

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in a greenlet of the hub loop, soon (so the loop watch sees it if
        it blocks). Never blocks; safe from any thread. After close: HubError, and the call
        never runs; a call posted before close runs before the hub shuts down."""
        with self._post_lock:
            if self.closed or self.loop is None:
                raise HubError("the session is closed")
            self.loop.run_callback_threadsafe(gevent.spawn, self._guarded, fn, args)

    def _guarded(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            fn(*args)
        except Exception:
            self.log.exception("hub_call_failed", call=getattr(fn, "__name__", repr(fn)))

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
        """Run ``fn(*args)`` in a greenlet on the hub loop and wait for its result, from any
        other thread (cooperatively, if that thread runs a gevent loop of its own)."""
        reply = threads.Reply()

        def run() -> None:
            try:
                reply.set(fn(*args))
            except BaseException as exc:
                reply.set(error=exc)

        self.post(run)
        if not reply.wait(timeout):
            raise HubError(f"hub call {getattr(fn, '__name__', fn)} timed out after {timeout} s")
        return reply.get(0)

    def wait_stopped(self, timeout: float) -> bool:
        """Wait (cooperatively on a loop) until the hub has stopped; True if it has."""
        return not self._ready.ready() or self._done.wait(timeout)

    def stop_grace(self, default: float) -> float:
        """How long a pilot may take to leave on its own: ``default``, less once the session's
        close timeout is running out (its forceful stop always runs to the end)."""
        if self._close_by is None:
            return default
        return max(0.0, min(default, self._close_by - time.monotonic()))

    def close(self, timeout: float = 60.0, why: Why = Why.SESSION_CLOSED) -> None:
        """Stop the hub and wait for its thread. ``timeout`` bounds the graceful part (agents
        leaving on their own); killing what is left and reaping it always completes. Units
        not final end CANCELED with ``why`` (the session closed, or the hub service stopped)."""
        with self._post_lock:
            first = not self.closed
            if first:
                self.closed = True
                self._close_why = why
                self._close_by = time.monotonic() + max(0.0, timeout)
            if first and self._ready.ready() and self._start_error is None \
                    and not self._done.ready():
                # As a greenlet, like posted calls: those posted before start before it.
                self.loop.run_callback_threadsafe(gevent.spawn, self._stop.set)
        # a second close waits for the first one's end too
        limit = max(0.0, timeout) + CLOSE_FORCE_S
        if not (self._thread.join(limit) if self._thread is not None else
                self.wait_stopped(limit)):
            self.log.error("hub_thread_did_not_stop", timeout=timeout)

    # -- profile ---------------------------------------------------------------------------------

    def _flush_profile(self) -> None:
        if self.profile.pending() and self.pool is not None:
            self.pool.for_path(self.profile.path).run(self.profile.flush, timeout=30)

    def _flush_loop(self) -> None:
        warn = SparseWarning(self.log, "profile_flush_failed", burst=1, window=30.0)
        while True:
            gevent.sleep(PROFILE_FLUSH_S)
            try:
                self._flush_profile()
            except Exception as exc:  # a full disk: the writer keeps the events and retries
                warn(error=str(exc), pending=self.profile.pending())

    def _collections_loop(self) -> None:
        """Tick the process's full-collection policy, if one is installed (rpg.gc_policy): the
        hub's activity is its event count, what it holds its units not yet final."""
        source = f"hub {self.session_uid} {id(self):x}"
        try:
            while True:  # the first tick at once: from then on the policy is in charge
                policy = gc_policy.installed()
                if policy is not None:
                    ledger = self.ledger
                    policy.tick(len(self.events), len(ledger.units) - ledger.units_final, source)
                gevent.sleep(GC_TICK_S)
        finally:
            policy = gc_policy.installed()
            if policy is not None:
                policy.forget(source)

    # -- what the agent says ---------------------------------------------------------------------

    def agent_final(self, unit: UnitRecord, state: str, ts: float, fields: dict[str, Any]) -> None:
        """The agent says a unit ended. Output that goes back to the application's machine
        (client://) from a remote pilot is the hub's to move first (the launcher's
        client_staging), on a greenlet of the unit's (lifecycle.py)."""
        pilot = self.pilots.get(unit.pilot) if unit.pilot else None
        launcher = pilot.launcher if pilot is not None else None
        staging = launcher.client_staging if launcher is not None else None
        if state == states.DONE and staging is not None and staging.has_stage_out(unit.desc):
            ClientStagingSteps(self, unit, staging).stage_out(state, ts, fields)
        else:
            self.moves.end_as_agent_said(unit, state, ts, fields)

    def _no_pilot(self, unit: UnitRecord, state: str, reason: str) -> None:
        self.ledger.end_unit(unit, state, "hub", Why.NO_PILOT, reason)

    def hand_over(self, pilot: PilotRecord, unit: UnitRecord) -> bool:
        """A pull took ``unit`` for ``pilot``: bind it. True if it goes to the agent now; False
        if the hub moves its client:// files first (then it joins the pilot's queue)."""
        self.ledger.bind(unit, pilot)
        staging = pilot.launcher.client_staging if pilot.launcher is not None else None
        if staging is not None and staging.has_stage_in(unit.desc):
            ClientStagingSteps(self, unit, staging).stage_in(pilot)
            return False
        return True

    def enqueue(self, unit: UnitRecord, pilot: PilotRecord) -> None:
        """Hand a bound, client-staged unit to its pilot's queue; the agent's next pull takes
        it."""
        pilot.queue.append(unit.uid)
        pilot.wake.set()

    # -- application calls (run on the loop via post) ------------------------------------------

    def submit_pilots(self, pmgr: str, items: list[tuple[str, dict[str, Any], str]]) -> None:
        for uid, desc, token in items:
            sandbox = desc.get("sandbox") or os.path.join(self.sandbox, uid)
            rec = self.ledger.new_pilot(uid, pmgr, desc, token, sandbox)
            rec.greenlet = gevent.spawn(PilotLifecycle(self, rec).run)

    def add_pilots(self, umgr: str, uids: list[str]) -> None:
        self.binding.add(umgr, uids)

    def remove_pilots(self, umgr: str, uids: list[str]) -> None:
        self.binding.remove(umgr, uids)

    def submit_units(self, umgr: str, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Make a record per unit and queue it for a pilot, in slices that let other calls
        run."""
        if self.watch is not None:
            self.watch.wake()  # its loop-lag ticker rested while no unit was held
        pending = self.pending_units
        for uid, _ in items:
            pending[uid] = [umgr, None]
        me = gevent.getcurrent()
        self._submitters.add(me)
        try:
            for start in range(0, len(items), SUBMIT_SLICE):
                if start:
                    yield_to_loop()
                now = time.time()
                for uid, desc in items[start:start + SUBMIT_SLICE]:
                    self._new_unit(uid, umgr, desc, now, pending.pop(uid, [None, None])[1])
                self.binding.wake(umgr)
        finally:
            self._submitters.discard(me)

    def _new_unit(self, uid: str, umgr: str, desc: dict[str, Any], now: float,
                  cancel: Why | None) -> None:
        rec = self.ledger.new_unit(uid, umgr, desc, now)
        problem = wire_problem(desc)
        if problem is not None:
            # It could never reach an agent; one unit's content must not fail a pilot's pull.
            self.ledger.end_unit(rec, states.FAILED, "hub", Why.UNSENDABLE,
                                 f"the description cannot be sent to an agent: {problem}")
            return
        if cancel is not None:  # canceled while its submit was still being taken in
            rec.cancel_why, rec.cancel_reason = cancel, CANCEL_WORDS[cancel]
            self.ledger.end_unit(rec, states.CANCELED, "hub", cancel, rec.cancel_reason)
            return
        self.binding.wait(rec)

    def cancel_units(self, uids: list[str] | None, umgr: str | None = None,
                     why: Why = Why.CANCELED) -> None:
        """Cancel units by uid (or all of ``umgr``'s), also those of a submit still being
        taken in."""
        pending = self.pending_units
        if uids is None:
            targets = [u for u in self.units.values() if umgr is None or u.umgr == umgr]
            for entry in pending.values():
                if umgr is None or entry[0] == umgr:
                    entry[1] = entry[1] or why
        else:
            targets = [self.units[u] for u in uids if u in self.units]
            for uid in uids:
                entry = pending.get(uid)
                if entry is not None:
                    entry[1] = entry[1] or why
        for i, unit in enumerate(targets):
            if i and i % CANCEL_SLICE == 0:
                yield_to_loop()  # 20,000 kills at once held the loop over 0.1 s
            self.cancel_unit(unit, why)

    def cancel_unit(self, unit: UnitRecord, why: Why) -> None:
        if states.is_final(unit.state) or unit.cancel_reason is not None:
            return
        unit.cancel_why, unit.cancel_reason = why, CANCEL_WORDS[why]
        pilot = self.pilots.get(unit.pilot) if unit.pilot else None
        if unit.greenlet is not None:  # the hub is moving its client:// files
            unit.greenlet.kill(block=False)
            unit.greenlet = None
        elif unit.at_agent and pilot is not None and not states.is_final(pilot.state):
            pilot.cancels.append(unit.uid)
            pilot.wake.set()
            return
        # Waiting for a pilot (its queue entry is dropped when reached), or in a pilot's queue
        # (a pull skips it): it ends now.
        self.ledger.end_unit(unit, states.CANCELED, "hub", why, unit.cancel_reason)

    def cancel_pilots(self, uids: list[str] | None, pmgr: str | None = None) -> None:
        if uids is None:
            targets = [p for p in self.pilots.values() if pmgr is None or p.pmgr == pmgr]
        else:
            targets = [self.pilots[u] for u in uids if u in self.pilots]
        for p in targets:
            if not states.is_final(p.state) and p.greenlet is not None:
                p.final_state_hint = p.final_state_hint or states.CANCELED
                p.final_why = p.final_why or Why.CANCELED
                _stop(p.greenlet)

    def snapshot(self) -> dict[str, Any]:
        """The session as a client attaching to it needs it: managers, pilots and units with
        their descriptions (their states and histories come from replaying the event stream).
        On the loop. A journaled session's is taken once what it shows is written, so that
        its ``seq`` is never ahead of what a restarted hub has."""
        if self.journal is not None and not self.closed:
            self.journal.sync()
        return {"uid": self.session_uid, "sandbox": self.sandbox, "profile": self.profile.path,
                "managers": [[uid, kind] for uid, kind in self.managers.items()],
                "pilots": [[p.uid, p.pmgr, p.desc, p.created] for p in self.pilots.values()],
                "units": [[u.uid, u.umgr, u.desc, u.created] for u in self.units.values()],
                "umgr_pilots": {m: list(ps) for m, ps in self.binding.umgr_pilots.items()}}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"units": len(self.units), "pilots": len(self.pilots),
                               "waiting_for_a_pilot": self.binding.waiting()}
        if self.watch is not None:
            out["loop"] = self.watch.stats()
        if self.pool is not None:
            out["lanes"] = self.pool.health()
        if self.service is not None:
            out["rpc"] = dict(self.service.counters)
        policy = gc_policy.installed()
        if policy is not None:
            out["gc"] = policy.stats()
        return out

    # -- shutdown ----------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        why = self._close_why
        self.log.info("hub_stopping", units=len(self.units), pilots=len(self.pilots),
                      why=why.value)
        for entry in self.pending_units.values():  # a submit still being taken in slices
            entry[1] = entry[1] or why
        gevent.joinall(list(self._submitters), timeout=30)
        live = [p for p in self.pilots.values() if not states.is_final(p.state)]
        for p in live:
            p.final_state_hint = p.final_state_hint or states.DONE
            p.final_why = p.final_why or why
            p.reason = p.reason or CANCEL_WORDS[why]
            if p.greenlet is not None:
                _stop(p.greenlet)
        gevent.joinall([p.greenlet for p in live if p.greenlet is not None], timeout=30)
        staging = []
        for i, unit in enumerate(list(self.units.values())):
            if i and i % SUBMIT_SLICE == 0:
                yield_to_loop()
            if not states.is_final(unit.state):  # waiting for a pilot, or client staging
                if unit.cancel_reason is None:
                    unit.cancel_why = why
                    unit.cancel_reason = CANCEL_WORDS[why]
                if unit.greenlet is not None:
                    staging.append(unit.greenlet)
                    unit.greenlet.kill(block=False)
                    unit.greenlet = None
                self.ledger.end_unit(unit, states.CANCELED, "hub", unit.cancel_why,
                                     unit.cancel_reason)
        gevent.joinall(staging, timeout=5)
        # On a service's loop nothing dies with this hub: what still runs is stopped here, and
        # every pilot ends before the stream does.
        left = [r.greenlet for r in (*self.pilots.values(), *self.units.values())
                if r.greenlet is not None and not r.greenlet.dead]
        if left:
            self.log.warning("lifecycles_killed_at_close", count=len(left))
            gevent.killall(left, block=True, timeout=5)
        for p in self.pilots.values():
            if not states.is_final(p.state):
                self.ledger.end_pilot(p, p.final_state_hint or states.CANCELED, why,
                                      p.reason or CANCEL_WORDS[why])


def _make_session_sandbox(path: str, profile: str) -> None:
    """A private directory that no other session has used: pilot uids start again at
    pilot.000001 in every session, so a second session there would find its pilots'
    sandboxes taken, and would mix its profile into the first one's. Blocking."""
    make_private_dir(path, "session sandbox")
    if os.path.lexists(profile):
        raise SandboxError(f"session sandbox {path} holds another session's profile "
                           f"({os.path.basename(profile)}): give each session a sandbox of "
                           f"its own (the default is a new one under the current directory)")


def loop_thread_target(body: Callable[[], None]) -> Callable[[], None]:
    """A thread target that runs ``body`` in a greenlet of the thread's own gevent hub, then
    destroys that hub. A greenlet still suspended when its thread ends can never be unwound
    and pins what its frames hold, so ``body`` must end every greenlet it started; and nothing
    of ``body`` is left in this frame when the hub is destroyed."""
    box = [body]

    def run() -> None:
        ghub = gevent.get_hub()
        route_loop_errors(ghub, SparseWarning(get_logger("hub"), "greenlet_failed"))
        g = gevent.spawn(box.pop())
        try:
            g.join()
        finally:
            del g
            # Let the loop run dry, so the hub greenlet itself ends when destroyed (one that is
            # suspended mid-loop would stay, with its loop, for the life of the process).
            if not ghub.join(timeout=5.0):
                get_logger("hub").warning("hub_loop_not_idle_at_exit")
            ghub.destroy(destroy_loop=True)

    return run


def _stop(g: Any) -> None:
    """Cancel a lifecycle: kill its greenlet if it has begun running. One that has not run yet
    is left to start: killing it would keep it from ever running its cleanup, so instead it
    finds the cancel flag set on its first step and ends itself."""
    if g.gr_frame is not None:
        g.kill(block=False)
