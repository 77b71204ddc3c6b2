"""``rpg.Executor``: a ``concurrent.futures.Executor`` whose calls run in the warm function
workers of rpg pilots (local, SSH, SLURM, or a hub service's).

Each ``submit`` pickles its call at once (so a bad argument is refused there, naming it) and
queues it. A dispatcher thread packs queued calls into function units of many calls each
(``UnitDescription(calls=...)``'s wire form), keeping at most two units in flight per core, so
one unit runs while the next waits at the agent. A unit's size follows the calls' measured
run time (about ``bundle_seconds`` of work, at most ``max_bundle`` calls), so quick calls go a
thousand to a unit and slow ones one by one. As in ``ProcessPoolExecutor``, a call is RUNNING
(``cancel()`` returns False) once it is packed into a unit; until then ``cancel()`` withdraws
it. A call that never started because its worker died under an earlier call is queued again;
the one that was running fails with the worker's fate as its exception.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import math
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from rpg import calls, states
from rpg.description import PilotDescription, UnitDescription
from rpg.log import get_logger
from rpg.session import Pilot, PilotManager, Session, UnitManager
from rpg.threads import Condition, Thread

EXECUTOR_RUNTIME_MIN = 7 * 24 * 60.0  # an own pilot lives until shutdown(), not a runtime


class ExecutorError(RuntimeError):
    """A call's unit ended without an outcome for it (canceled, its pilot ended)."""


class _Call:
    __slots__ = ("future", "packed", "again")

    def __init__(self, future: cf.Future, packed: tuple[bytes, str, bytes]) -> None:
        self.future = future
        self.packed = packed
        self.again = False  # queued again (it never started): its future is RUNNING already


class Executor(cf.Executor):
    """``Executor(cores=N)``: an own Session and local pilot of N cores, closed at
    ``shutdown()``. ``Executor(session=s, pilots=[p, ...])``: pilots of an existing session
    (which stays open), through a unit manager of the executor's own."""

    def __init__(self, cores: int | None = None, *, session: Session | None = None,
                 pilots: Sequence[Pilot] | None = None, max_bundle: int = 4096,
                 bundle_seconds: float = 0.05) -> None:
        if isinstance(max_bundle, bool) or not isinstance(max_bundle, int) or not \
                1 <= max_bundle <= calls.MAX_CALLS:
            raise ValueError(f"Executor: max_bundle must be an integer 1..{calls.MAX_CALLS}, "
                             f"got {max_bundle!r}")
        if not isinstance(bundle_seconds, (int, float)) or not bundle_seconds > 0:
            raise ValueError(f"Executor: bundle_seconds must be > 0, got {bundle_seconds!r}")
        self._own: Session | None = None
        if session is None:
            if pilots:
                raise ValueError("Executor: pilots= needs the session= they belong to")
            cores = 2 if cores is None else cores
            desc = PilotDescription(cores=cores, runtime=EXECUTOR_RUNTIME_MIN)  # checks cores
            self._own = session = Session()
            try:
                pilots = [PilotManager(session).submit_pilots(desc)]
            except BaseException:
                session.close()
                raise
        else:
            if cores is not None:
                raise ValueError("Executor: give cores= (an own pilot) or session= and pilots=, "
                                 "not both")
            if not pilots:
                raise ValueError("Executor: session= needs pilots=[...] to run on")
        self._session = session
        self._umgr = UnitManager(session)
        self._umgr.add_pilots(list(pilots))
        self._window = 2 * sum(int(p.description.cores) for p in pilots)
        self._max_bundle = max_bundle
        self._bundle_s = float(bundle_seconds)
        self._packer = calls.Packer()
        self._cond = Condition()
        self._pending: collections.deque[_Call] = collections.deque()
        self._inflight: dict[str, list[_Call]] = {}
        self._per_call: float | None = None  # seconds a call takes, as measured (EWMA)
        self._shutdown = False
        self._log = get_logger("executor", session=session.uid)
        self.units = 0  # units submitted: each carries a bundle of calls
        self._umgr.register_callback(self._on_state)
        self._thread = Thread(self._dispatch, "rpg-executor")
        self._thread.start()

    # -- the concurrent.futures API --------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        return self._submit(fn, "call", (args, kwargs), "Executor.submit: ")

    def _submit(self, fn: Callable[..., Any], mode: str, data: Any, where: str) -> cf.Future:
        packed = self._packer.call(fn, mode, data, where)  # raises CallPackError, naming it
        future: cf.Future = cf.Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._pending.append(_Call(future, packed))
            if len(self._inflight) < self._window:
                self._cond.notify_all()
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:
        """As ``ProcessPoolExecutor.map``: ``chunksize`` items go as one call."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"Executor.map: chunksize must be an integer >= 1, got "
                             f"{chunksize!r}")
        end = None if timeout is None else time.monotonic() + timeout
        items = zip(*iterables, strict=False)  # as the stdlib: the shortest ends it
        if chunksize == 1:
            fs = [self._submit(fn, "call", (a, {}), "Executor.map: ") for a in items]
        else:
            fs = []
            while True:
                chunk = list(itertools.islice(items, chunksize))
                if not chunk:
                    break
                fs.append(self._submit(fn, "map", chunk, "Executor.map: "))

        def results() -> Iterator[Any]:
            try:
                fs.reverse()
                while fs:
                    f = fs.pop()
                    r = f.result(None if end is None else end - time.monotonic())
                    if chunksize == 1:
                        yield r
                    else:
                        yield from r
            finally:
                for f in fs:
                    f.cancel()
        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submits; ``cancel_futures`` withdraws the queued calls. With ``wait``, returns
        when every call has ended and an own session is closed (else that happens behind)."""
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for c in self._pending:
                    c.future.cancel()
                self._pending.clear()
            self._cond.notify_all()
        if wait:
            self._thread.join()

    @property
    def session(self) -> Session:
        return self._session

    # -- the dispatcher --------------------------------------------------------------------------

    def _bundle_size(self) -> int:
        free = max(1, self._window - len(self._inflight))
        fair = math.ceil(len(self._pending) / free)
        by_time = 1 if self._per_call is None else \
            int(self._bundle_s / max(self._per_call, 1e-7))
        return max(1, min(self._max_bundle, fair, by_time))

    def _dispatch(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._pending and len(self._inflight) < self._window):
                        if self._shutdown and not self._pending and not self._inflight:
                            return
                        self._cond.wait(1.0)
                    n = self._bundle_size()
                    batch: list[_Call] = []
                    while self._pending and len(batch) < n:
                        c = self._pending.popleft()
                        if c.again or c.future.set_running_or_notify_cancel():
                            batch.append(c)
                    if not batch:
                        continue
                    self._send(batch)
        finally:
            self._close_own()

    def _send(self, batch: list[_Call]) -> None:
        """Submit one unit for ``batch`` (under the lock: its callbacks wait for the entry)."""
        try:
            payload = self._packer.assemble([c.packed for c in batch])
            unit = self._umgr.submit_units(UnitDescription(payload=payload, calls=len(batch)))
        except Exception as exc:
            for c in batch:
                c.future.set_exception(exc)
            return
        self.units += 1
        self._inflight[unit.uid] = batch

    def _on_state(self, unit: Any, state: str) -> None:
        if state not in states.FINAL:
            return
        with self._cond:
            batch = self._inflight.pop(unit.uid, None)
            if batch is None:
                return
            results = unit.results or []
            again: list[_Call] = []
            ran = 0.0
            ok = 0
            for i, c in enumerate(batch):
                rec = results[i] if i < len(results) else None
                if rec is None:
                    c.future.set_exception(ExecutorError(
                        f"its unit {unit.uid} ended {state} before the call's outcome came "
                        f"back: {unit.reason}"))
                elif rec[0] == calls.NOT_RUN:
                    c.again = True
                    again.append(c)
                elif rec[0] == calls.OK:
                    ok += 1
                    ran += rec[3]
                    try:
                        c.future.set_result(calls.value(rec))
                    except Exception as exc:  # the value does not unpickle here
                        c.future.set_exception(exc)
                else:
                    c.future.set_exception(calls.exception(rec))
            if ok:
                per = ran / ok
                self._per_call = per if self._per_call is None else \
                    0.7 * self._per_call + 0.3 * per
            self._pending.extendleft(reversed(again))
            self._cond.notify_all()

    def _close_own(self) -> None:
        if self._own is not None:
            try:
                self._own.close()
            except Exception as exc:
                self._log.error("executor_session_close_failed", error=str(exc)[:300])

    def __repr__(self) -> str:
        return (f"<rpg.Executor session={self._session.uid} window={self._window} "
                f"queued={len(self._pending)} units_in_flight={len(self._inflight)}>")
