"""The hub: one native thread, one gevent loop, every unit and pilot lifecycle as a greenlet.

The application thread never touches hub state: it posts calls onto the hub loop
(``loop.run_callback_threadsafe``) and receives state events through a queue that the session's
callback thread drains. Everything blocking (disk, spawn, network) goes to the hub's IOPool.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, Callable

import gevent
import zerorpc
import zmq
from gevent.event import Event

from rpg import states, threads
from rpg.hub.lifecycle import PilotLifecycle, UnitLifecycle
from rpg.hub.records import PilotRecord, UnitRecord
from rpg.hub.service import HubService
from rpg.io_pool import IOPool, LoopWatch
from rpg.log import ProfileWriter, SparseWarning, get_logger
from rpg.rpc import no_zero_copy, wire_problem

PROFILE_FLUSH_S = 0.2
SUBMIT_SLICE = 500  # units a submit takes per loop iteration: 20,000 at once held the loop 0.45 s


class HubError(RuntimeError):
    """The hub could not start, or was used after close."""


class Hub:
    """Owns the hub thread. Public methods are called from application threads."""

    def __init__(self, session_uid: str, sandbox: str, address: str, events: Any) -> None:
        if not address.startswith("tcp://"):
            raise HubError(f"hub_address must be tcp://host:port, got {address!r}")
        self.session_uid = session_uid
        self.sandbox = sandbox
        self.requested_address = address
        self.address: str | None = None
        self.events = events
        self.profile = ProfileWriter(os.path.join(sandbox, "profile.jsonl"))
        self.units: dict[str, UnitRecord] = {}
        self.pilots: dict[str, PilotRecord] = {}
        self.umgr_pilots: dict[str, list[str]] = {}
        self._rr = itertools.count()
        self._pilots_changed = Event()
        # Accepted, not yet made into records (a big submit is taken in slices): uid -> [umgr,
        # cancel reason or None], so a cancel that arrives meanwhile reaches them too.
        self.pending_units: dict[str, list[Any]] = {}
        self._submitters: set[Any] = set()
        self._thread = threads.Thread(_loop_thread(self._main), f"rpg-hub-{session_uid}")
        self._ready = threads.Event()
        self._done = threads.Event()
        self._post_lock = threads.Lock()
        self._start_error: BaseException | None = None
        self._stop: Event | None = None
        self.loop: Any = None
        self.pool: IOPool | None = None
        self.watch: LoopWatch | None = None
        self.service: HubService | None = None
        self.closed = False
        self.stuck_threads_at_close = 0
        self.log = get_logger("hub", session=session_uid)

    # -- thread and loop -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise HubError(f"hub did not start within {timeout} s")
        if self._start_error is not None:
            self._thread.join(5)
            raise HubError(f"hub failed to start: {self._start_error}") from self._start_error

    def _main(self) -> None:
        """The hub thread's work, in a greenlet of its loop (see _loop_thread)."""
        self.loop = gevent.get_hub().loop
        ctx = server = server_g = flusher = None
        try:
            self._stop = Event()
            self.watch = LoopWatch("hub").start()
            self.pool = IOPool()
            self.pool.for_path(self.sandbox).run(os.makedirs, self.sandbox, exist_ok=True,
                                                 timeout=30)
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
            self.address = server._events._socket.getsockopt(zmq.LAST_ENDPOINT).decode()
            server_g = gevent.spawn(server.run)
            flusher = gevent.spawn(self._flush_loop)
            self.log.info("hub_started", address=self.address, sandbox=self.sandbox)
        except BaseException as exc:  # report to start(), then clean up below
            self._start_error = exc
        finally:
            self._ready.set()
        try:
            if self._start_error is None:
                self._stop.wait()
                self._shutdown()
        finally:
            for g in (flusher, server_g):
                if g is not None:
                    g.kill(block=True, timeout=2)
            if server is not None:
                server.close()
            if ctx is not None:
                ctx.destroy(linger=0)
            try:
                if self.pool is not None:
                    try:
                        self._flush_profile()
                    except Exception as exc:  # a full disk: say what is lost, close anyway
                        self.log.error("profile_not_flushed_at_close", error=str(exc),
                                       events_lost=self.profile.pending())
                    self.stuck_threads_at_close = self.pool.close(wait=2.0)
            finally:
                if self.watch is not None:
                    self.watch.stop()
                self._done.set()

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
        """Run ``fn(*args)`` in a greenlet on the hub loop and wait for its result (app side)."""
        done = threads.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()

        self.post(run)
        if not done.wait(timeout):
            raise HubError(f"hub call {getattr(fn, '__name__', fn)} timed out after {timeout} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def close(self, timeout: float = 60.0) -> None:
        with self._post_lock:
            if self.closed:
                return
            self.closed = True
            if self._ready.is_set() and self._start_error is None and not self._done.is_set():
                # As a greenlet, like posted calls: those posted before start before it.
                self.loop.run_callback_threadsafe(gevent.spawn, self._stop.set)
        if not self._thread.join(timeout):
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

    # -- state changes ---------------------------------------------------------------------------

    def emit(self, kind: str, rec: Any, new: str, component: str, ts: float | None = None,
             **fields: Any) -> None:
        """Move ``rec`` to ``new`` (filling skipped states) and deliver each step once."""
        steps = states.path(kind, rec.state, new)
        ts = ts or time.time()
        for st in steps:
            rec.state = st
            extra = fields if st == new else {}
            self.profile.add(ts, rec.uid, st, component, **extra)
            self.events.put((kind, rec.uid, st, ts, extra))

    def unit_final(self, unit: UnitRecord, state: str, component: str, reason: str | None = None,
                   ts: float | None = None, **fields: Any) -> None:
        """End a unit (idempotent): fields, the final event, pilot bookkeeping."""
        if states.is_final(unit.state):
            return
        if reason is not None:
            unit.reason = reason
            fields["reason"] = reason
        for k in ("exit_code", "stdout", "stderr", "sandbox"):
            if k in fields:
                setattr(unit, k, fields[k])
        self.emit("unit", unit, state, component, ts=ts, **fields)
        pilot = self.pilots.get(unit.pilot) if unit.pilot else None
        if pilot is not None:
            pilot.in_flight.discard(unit.uid)
            pilot.load_cores -= int(unit.desc["cores"])
        unit.final.set()
        unit.wake.set()

    def restart_unit(self, unit: UnitRecord, reason: str) -> None:
        """A restartable unit whose pilot died goes back to NEW and is bound again."""
        pilot = self.pilots.get(unit.pilot) if unit.pilot else None
        if pilot is not None:
            pilot.in_flight.discard(unit.uid)
            pilot.load_cores -= int(unit.desc["cores"])
        unit.pilot = None
        unit.at_agent = False
        unit.done_at_agent = None
        unit.restarts += 1
        states.check_restart("unit", unit.state)
        unit.state = states.NEW
        ts = time.time()
        fields = {"reason": f"restarting: {reason}", "restarts": unit.restarts}
        self.profile.add(ts, unit.uid, states.NEW, "hub", **fields)
        self.events.put(("unit", unit.uid, states.NEW, ts, fields))
        unit.restart = True
        unit.wake.set()

    def agent_final(self, unit: UnitRecord, state: str, ts: float, fields: dict[str, Any]) -> None:
        """The agent says a unit ended. Output that goes back to the application's machine
        (client://) is the launcher's to move first: the lifecycle greenlet does that."""
        pilot = self.pilots.get(unit.pilot) if unit.pilot else None
        launcher = pilot.launcher if pilot is not None else None
        if state == states.DONE and launcher is not None and launcher.has_stage_out(unit.desc):
            unit.done_at_agent = (state, ts, fields)
            unit.wake.set()
        else:
            self.unit_final(unit, state, "agent", ts=ts, **fields)

    # -- binding ---------------------------------------------------------------------------------

    def pilots_changed(self) -> None:
        ev, self._pilots_changed = self._pilots_changed, Event()
        ev.set()

    def wait_pilots_changed(self, timeout: float | None = None) -> None:
        self._pilots_changed.wait(timeout)

    def choose_pilot(self, unit: UnitRecord) -> tuple[PilotRecord | None, str | None]:
        """(pilot, None) to bind to, (None, None) to wait, or (None, reason) to fail."""
        uids = self.umgr_pilots.get(unit.umgr, [])
        pilots = [self.pilots[u] for u in uids if u in self.pilots]
        if not pilots:
            return None, None
        want_cores = int(unit.desc["cores"])
        want_gpus = int(unit.desc["gpus"])
        tags = unit.desc.get("tags") or {}
        live = [p for p in pilots if p.active()]
        if not live:
            if unit.desc.get("restartable"):
                return None, None  # waits for a pilot to be added
            return None, "no pilot left to run it: every pilot of its unit manager has ended"
        fits = [p for p in live if p.cores >= want_cores and int(p.desc["gpus"]) >= want_gpus
                and _tags_match(tags, p)]
        if not fits:
            return None, (f"no pilot can run it: it needs {want_cores} cores, {want_gpus} gpus"
                          f"{', tags ' + repr(tags) if tags else ''}")
        start = next(self._rr) % len(fits)
        ordered = fits[start:] + fits[:start]
        for p in ordered:
            if p.load_cores + want_cores <= p.cores:
                return p, None
        return min(ordered, key=lambda p: p.load_cores / p.cores), None

    def bind(self, unit: UnitRecord, pilot: PilotRecord) -> None:
        unit.pilot = pilot.uid
        pilot.load_cores += int(unit.desc["cores"])
        self.emit("unit", unit, states.BOUND, "hub", pilot=pilot.uid)

    def enqueue(self, unit: UnitRecord, pilot: PilotRecord) -> None:
        """Hand a bound unit to its pilot's queue; the agent's next pull takes it."""
        pilot.queue.append(unit.uid)
        pilot.wake.set()

    # -- application calls (run on the loop via post) ------------------------------------------

    def submit_pilots(self, pmgr: str, items: list[tuple[str, dict[str, Any], str]]) -> None:
        for uid, desc, token in items:
            sandbox = desc.get("sandbox") or os.path.join(self.sandbox, uid)
            rec = PilotRecord(uid, pmgr, desc, token, sandbox)
            self.pilots[uid] = rec
            self.profile.add(time.time(), uid, states.NEW, "hub", resource=desc["resource"])
            rec.greenlet = gevent.spawn(PilotLifecycle(self, rec).run)
        self.pilots_changed()

    def add_pilots(self, umgr: str, uids: list[str]) -> None:
        lst = self.umgr_pilots.setdefault(umgr, [])
        for uid in uids:
            if uid not in lst:
                lst.append(uid)
        self.pilots_changed()

    def remove_pilots(self, umgr: str, uids: list[str]) -> None:
        lst = self.umgr_pilots.setdefault(umgr, [])
        self.umgr_pilots[umgr] = [u for u in lst if u not in uids]
        self.pilots_changed()

    def submit_units(self, umgr: str, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Make a record and a lifecycle per unit, in slices that let other calls run."""
        self.umgr_pilots.setdefault(umgr, [])
        pending = self.pending_units
        for uid, _ in items:
            pending[uid] = [umgr, None]
        me = gevent.getcurrent()
        self._submitters.add(me)
        try:
            for start in range(0, len(items), SUBMIT_SLICE):
                if start:
                    gevent.sleep(0)
                now = time.time()
                for uid, desc in items[start:start + SUBMIT_SLICE]:
                    cancel = pending.pop(uid, [None, None])[1]
                    self._new_unit(uid, umgr, desc, now, cancel)
        finally:
            self._submitters.discard(me)

    def _new_unit(self, uid: str, umgr: str, desc: dict[str, Any], now: float,
                  cancel: str | None) -> None:
        rec = UnitRecord(uid, umgr, desc)
        self.units[uid] = rec
        self.profile.add(now, uid, states.NEW, "hub")
        problem = wire_problem(desc)
        if problem is not None:
            # It could never reach an agent; one unit's content must not fail a pilot's pull.
            self.unit_final(rec, states.FAILED, "hub",
                            reason=f"the description cannot be sent to an agent: {problem}")
            return
        rec.cancel_reason = cancel
        rec.greenlet = gevent.spawn(UnitLifecycle(self, rec).run)

    def cancel_units(self, uids: list[str] | None, reason: str = "canceled by the application",
                     umgr: str | None = None) -> None:
        pending = self.pending_units
        if uids is None:
            targets = [u for u in self.units.values() if umgr is None or u.umgr == umgr]
            for entry in pending.values():
                if umgr is None or entry[0] == umgr:
                    entry[1] = entry[1] or reason
        else:
            targets = [self.units[u] for u in uids if u in self.units]
            for uid in uids:
                entry = pending.get(uid)
                if entry is not None:
                    entry[1] = entry[1] or reason
        for unit in targets:
            self.cancel_unit(unit, reason)

    def cancel_unit(self, unit: UnitRecord, reason: str) -> None:
        if states.is_final(unit.state) or unit.cancel_reason is not None:
            return
        unit.cancel_reason = reason
        pilot = self.pilots.get(unit.pilot) if unit.pilot else None
        if unit.at_agent and pilot is not None and not states.is_final(pilot.state):
            pilot.cancels.append(unit.uid)
            pilot.wake.set()
        elif unit.greenlet is not None:
            _stop(unit.greenlet)

    def cancel_pilots(self, uids: list[str] | None, pmgr: str | None = None) -> None:
        if uids is None:
            targets = [p for p in self.pilots.values() if pmgr is None or p.pmgr == pmgr]
        else:
            targets = [self.pilots[u] for u in uids if u in self.pilots]
        for p in targets:
            if not states.is_final(p.state) and p.greenlet is not None:
                p.final_state_hint = p.final_state_hint or states.CANCELED
                _stop(p.greenlet)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"units": len(self.units), "pilots": len(self.pilots)}
        if self.watch is not None:
            out["loop"] = self.watch.stats()
        if self.pool is not None:
            out["lanes"] = self.pool.health()
        if self.service is not None:
            out["rpc"] = dict(self.service.counters)
        return out

    # -- shutdown ----------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self.log.info("hub_stopping", units=len(self.units), pilots=len(self.pilots))
        for entry in self.pending_units.values():  # a submit still being taken in slices
            entry[1] = entry[1] or "session closed"
        gevent.joinall(list(self._submitters), timeout=30)
        live = [p for p in self.pilots.values() if not states.is_final(p.state)]
        for p in live:
            p.final_state_hint = p.final_state_hint or states.DONE
            p.reason = p.reason or "session closed"
            if p.greenlet is not None:
                _stop(p.greenlet)
        gevent.joinall([p.greenlet for p in live if p.greenlet is not None], timeout=30)
        for unit in list(self.units.values()):
            if not states.is_final(unit.state):
                unit.cancel_reason = unit.cancel_reason or "session closed"
                if unit.greenlet is not None:
                    _stop(unit.greenlet)
        gevent.joinall([u.greenlet for u in self.units.values() if u.greenlet is not None],
                       timeout=10)
        for unit in self.units.values():  # belt and braces: nothing leaves without a final state
            if not states.is_final(unit.state):
                self.unit_final(unit, states.CANCELED, "hub", reason="session closed")


def _loop_thread(body: Callable[[], None]) -> Callable[[], None]:
    """A thread target that runs ``body`` in a greenlet of the thread's own gevent hub, then
    destroys that hub. A greenlet still suspended when its thread ends can never be unwound
    and pins what its frames hold, so ``body`` must end every greenlet it started; and nothing
    of ``body`` is left in this frame when the hub is destroyed."""
    box = [body]

    def run() -> None:
        ghub = gevent.get_hub()
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


def _tags_match(tags: dict[str, str], pilot: PilotRecord) -> bool:
    ptags = pilot.desc.get("tags") or {}
    for k, v in tags.items():
        if k == "pilot":
            if v != pilot.uid:
                return False
        elif ptags.get(k) != v:
            return False
    return True
