"""``rpg.MapReduce``: progressive, cached, cancelable statistics over large files, computed in
the warm function workers of rpg pilots (binglide's request/answer design on rpg's units).

A job first probes its files on a pilot (their identity names the cache files), then plans its
range (``cache.ChunkCache.plan``): cached chunks give the first answer at once, the rest become
chunk tasks. A task is one function unit; tasks are keyed by what they compute, so a second job
that needs a chunk already queued or running joins it instead of computing it again. A
coordinator thread keeps at most ``window`` units in flight, taking tasks from the jobs in turn,
so a big job does not hold back a small one. Each finished chunk is cached and adds an answer
to every job that waits for it, with the coverage reached; the last answer is final and exact.
``cancel`` ends a job at once (no more answers); its tasks that no other live job needs are
withdrawn, or, if running, their units are canceled, which kills the worker's process group.
A task whose unit fails for any other reason than the file (its worker died, a read timed out,
its pilot ended) runs again, up to ``retries`` times; then its jobs fail with the reason.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from rpg import calls, states
from rpg.description import UnitDescription
from rpg.log import get_logger
from rpg.mapreduce import chunks
from rpg.mapreduce.cache import ChunkCache
from rpg.mapreduce.kinds import BUILTIN, Kind, make_kind
from rpg.session import Pilot, Session, SessionClosed, UnitManager
from rpg.threads import Condition, Thread

RUNNING, DONE, CANCELED, FAILED = "RUNNING", "DONE", "CANCELED", "FAILED"
_FATAL = (chunks.FileChanged.__name__, chunks.NotRegularFile.__name__, "FileNotFoundError",
          "PermissionError", "IsADirectoryError")
_instances = itertools.count(1)


class Answer(NamedTuple):
    """One answer of a job: ``value`` over the ``coverage`` (0..1) of the range reached so far."""

    value: Any
    coverage: float
    from_cache: bool
    final: bool


class MapReduceError(RuntimeError):
    """A job failed; ``reason`` says why (the chunk's error, or a bad range)."""


class _Task:
    """A unit's worth of work, shared by every live job that needs it."""

    __slots__ = ("key", "fn", "args", "jobs", "uid", "attempts", "piece")

    def __init__(self, key: tuple, fn: Callable[..., Any], args: tuple, piece: Any) -> None:
        self.key = key
        self.fn = fn
        self.args = args
        self.piece = piece  # (cache key, start, end, level) of a chunk; None for a probe
        self.jobs: set[Job] = set()
        self.uid: str | None = None  # set once submitted
        self.attempts = 0


class Job:
    """One request: answers arrive as chunks finish; ``id`` cancels it from anywhere."""

    def __init__(self, mr: "MapReduce", jid: str, kind: Kind, paths: list[str], start: int,
                 end: int | None) -> None:
        self.id = jid
        self.kind = kind.name
        self.paths = paths
        self.start = start
        self.end = end
        self._kind = kind
        self._mr = mr
        self._cond = mr._cond
        self._state = RUNNING
        self.reason: str | None = None
        self._latest: Answer | None = None
        self.answered = 0  # answers made so far
        self._acc: Any = None
        self._covered = 0
        self._waiting = 0  # pieces still to come
        self.submitted = time.monotonic()

    @property
    def state(self) -> str:
        return self._state

    def answers(self, timeout: float | None = None) -> Iterator[Answer]:
        """Yield answers as they come, the last one final; nothing after a cancel. A consumer
        that falls behind gets the latest answer (coverage only rises), not every one. Raises
        MapReduceError if the job fails, TimeoutError if it has not ended within ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while True:
            with self._cond:
                while seen >= self.answered and self._state == RUNNING:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"job {self.id}: no final answer within {timeout} s")
                    self._cond.wait(left)
                if self._state == CANCELED:
                    return
                if seen >= self.answered:
                    if self._state == FAILED:
                        raise MapReduceError(f"job {self.id} failed: {self.reason}")
                    return
                a = self._latest
                seen = self.answered
            assert a is not None
            yield a
            if a.final:
                return

    def result(self, timeout: float | None = None) -> Any:
        """The final value (waits for it). CancelledError if canceled."""
        last = None
        for a in self.answers(timeout):
            last = a
        if self._state == CANCELED:
            raise cf.CancelledError(f"job {self.id} was canceled")
        assert last is not None and last.final
        return last.value

    def cancel(self) -> bool:
        """End the job now: no more answers; its chunk work stops unless another job needs it.
        False if it had already ended."""
        return self._mr._cancel_job(self)

    def __repr__(self) -> str:
        return f"<rpg.mapreduce.Job {self.id} {self.kind} {self._state}>"


class MapReduce:
    """``MapReduce(session, pilots=[...], cache_dir=DIR)``: ``submit(kind, paths, start, end)``
    returns a Job. Paths are paths on the pilots' hosts (every pilot must see the same files).
    The session stays open; ``close()`` cancels the jobs still running."""

    def __init__(self, session: Session, pilots: Sequence[Pilot], cache_dir: str, *,
                 cache_limit: int = 1 << 30, min_chunk: int = 1 << 20,
                 max_chunk: int = 64 << 20, retries: int = 2, read_timeout: float = 30.0,
                 window: int | None = None) -> None:
        for name, v in (("min_chunk", min_chunk), ("max_chunk", max_chunk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 4096 or v & (v - 1):
                raise ValueError(f"MapReduce: {name} must be a power of two >= 4096, got {v!r}")
        if max_chunk < min_chunk:
            raise ValueError(f"MapReduce: max_chunk ({max_chunk}) is below min_chunk "
                             f"({min_chunk})")
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 100:
            raise ValueError(f"MapReduce: retries must be an integer 0..100, got {retries!r}")
        if not isinstance(read_timeout, (int, float)) or not read_timeout > 0:
            raise ValueError(f"MapReduce: read_timeout must be > 0 s, got {read_timeout!r}")
        if isinstance(cache_limit, bool) or not isinstance(cache_limit, int) or cache_limit < 0:
            raise ValueError(f"MapReduce: cache_limit must be bytes >= 0, got {cache_limit!r}")
        if not pilots:
            raise ValueError("MapReduce: pilots=[...] is required (the pilots that read the "
                             "files)")
        self.cache = ChunkCache(cache_dir, cache_limit)
        self.min_chunk, self.max_chunk = min_chunk, max_chunk
        self.retries, self.read_timeout = retries, float(read_timeout)
        self.kinds: dict[str, Kind] = dict(BUILTIN)
        slots = sum(int(p.description.function_workers or p.description.cores) for p in pilots)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or
                                   window < 1):
            raise ValueError(f"MapReduce: window must be an integer >= 1, got {window!r}")
        self.window = window if window is not None else 2 * slots
        self._session = session
        self._umgr = UnitManager(session)
        self._umgr.add_pilots(list(pilots))
        self._cid = f"{session.uid}.mr{next(_instances)}"
        self._rids = itertools.count(1)
        self._cond = Condition()
        self._jobs: dict[str, Job] = {}
        self._tasks: dict[tuple, _Task] = {}
        self._by_uid: dict[str, _Task] = {}
        self._queues: dict[Job, collections.deque[_Task]] = {}  # tasks not yet submitted
        self._new: list[Job] = []
        self._finished: list[Any] = []
        self._withdraw: list[str] = []  # uids of running tasks no live job needs
        self._closed = False
        self.units = 0  # units submitted (probes and chunks)
        self._log = get_logger("mapreduce", session=session.uid)
        self._umgr.register_callback(self._on_state)
        self._thread = Thread(self._run, "rpg-mapreduce")
        self._thread.start()

    # -- the API ---------------------------------------------------------------------------------

    def register(self, name: str, map: Callable[..., Any], reduce: Callable[[Any, Any], Any],
                 finish: Callable[[Any], Any] | None = None, zero: Any = None, files: int = 1,
                 prefix: str | None = None) -> None:
        """Add a kind: ``map(*blocks)`` and ``reduce(a, b)`` (see ``rpg.mapreduce.kinds``). Its
        cache files start with ``prefix`` (default: NAME in capitals); give a new prefix when
        the map changes, or old cached chunks are reused."""
        kind = make_kind(name, map, reduce, finish, zero, files, prefix)
        with self._cond:
            if name in self.kinds:
                raise ValueError(f"register: kind {name!r} exists already")
            for k in self.kinds.values():
                if k.prefix == kind.prefix and (k.map is not kind.map or
                                                k.reduce is not kind.reduce):
                    raise ValueError(f"register: prefix {kind.prefix!r} is kind {k.name!r}'s")
            self.kinds[name] = kind

    def submit(self, kind: str, paths: str | Sequence[str], start: int = 0,
               end: int | None = None) -> Job:
        if isinstance(paths, str):
            paths = [paths]
        with self._cond:
            k = self.kinds.get(kind)
        if k is None:
            raise ValueError(f"submit: kind {kind!r} is not one of {sorted(self.kinds)}")
        paths = list(paths)
        if len(paths) != k.files or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"submit: kind {kind!r} takes {k.files} file path(s), got "
                             f"{paths!r}")
        for name, v in (("start", start), ("end", end)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"submit: {name} must be an integer >= 0, got {v!r}")
        if end is not None and end <= start:
            raise ValueError(f"submit: end ({end}) must be above start ({start})")
        with self._cond:
            if self._closed:
                raise RuntimeError("MapReduce is closed")
            jid = f"{len(self._cid)}:{self._cid}{next(self._rids)}"  # binglide's job id
            job = Job(self, jid, k, paths, start, end)
            self._jobs[jid] = job
            self._new.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel the job of this id (from any thread); False if it is unknown or ended."""
        with self._cond:
            job = self._jobs.get(job_id)
        return False if job is None else job.cancel()

    def jobs(self) -> list[Job]:
        """The jobs still running."""
        with self._cond:
            return list(self._jobs.values())

    def close(self, timeout: float = 30.0) -> None:
        """Cancel the running jobs and stop the coordinator (the session stays open)."""
        with self._cond:
            self._closed = True  # first: a submit racing this close is refused, not lost
            for job in list(self._jobs.values()):
                self._end(job, CANCELED, "canceled: the MapReduce was closed")
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> "MapReduce":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- job ends (under the lock) ---------------------------------------------------------------

    def _end(self, job: Job, state: str, reason: str | None = None) -> None:
        if job._state != RUNNING:
            return
        job._state = state
        job.reason = reason
        self._jobs.pop(job.id, None)
        self._queues.pop(job, None)
        for task in [t for t in self._tasks.values() if job in t.jobs]:
            task.jobs.discard(job)
            if not task.jobs:
                self._tasks.pop(task.key, None)
                if task.uid:
                    self._by_uid.pop(task.uid, None)
                    self._withdraw.append(task.uid)
        self._log.info("mapreduce_job_end", job=job.id, state=state, reason=reason,
                       seconds=round(time.monotonic() - job.submitted, 3))
        self._cond.notify_all()

    def _cancel_job(self, job: Job) -> bool:
        with self._cond:
            if job._state != RUNNING:
                return False
            self._end(job, CANCELED, "canceled")
            return True

    def _answer(self, job: Job, value: Any, span: int, from_cache: bool) -> None:
        k = job._kind
        try:  # the kind's own code: what it raises fails this job only
            acc = value if job._acc is None else k.reduce(job._acc, value)
            shown = k.finish(acc)
        except Exception as exc:
            self._end(job, FAILED, f"kind {k.name!r}: its reduce or finish raised {exc!r}"[:2000])
            return
        job._acc = acc
        job._covered += span
        total = job.end - job.start  # type: ignore[operator]
        final = job._waiting == 0
        job._latest = Answer(shown, 1.0 if final else job._covered / total, from_cache, final)
        job.answered += 1
        if final:
            self._end(job, DONE)
        self._cond.notify_all()

    # -- the coordinator thread ------------------------------------------------------------------

    def _on_state(self, unit: Any, state: str) -> None:
        if state in states.FINAL and self._thread.is_alive():
            with self._cond:
                self._finished.append(unit)
                self._cond.notify_all()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._new or self._finished or self._withdraw or
                               (self._queues and len(self._by_uid) < self.window)):
                        if self._session._closed:
                            raise SessionClosed(f"session {self._session.uid} is closed")
                        if self._closed:
                            return
                        self._cond.wait(1.0)
                    new, self._new = self._new, []
                    done, self._finished = self._finished, []
                    withdraw, self._withdraw = self._withdraw, []
                if withdraw:
                    self._umgr.cancel_units(withdraw)
                for job in new:
                    self._start(job)
                for unit in done:
                    self._collect(unit)
                self._dispatch()
        except Exception as exc:
            closed = isinstance(exc, SessionClosed)
            why = "its session was closed" if closed else \
                f"the MapReduce coordinator failed: {exc!r}"
            if not closed:
                self._log.error("mapreduce_coordinator_failed", error=repr(exc)[:500])
            with self._cond:
                self._closed = True
                for job in list(self._jobs.values()):
                    self._end(job, FAILED, why)
                running = [uid for uid in self._withdraw if uid]
            if running and not closed:
                try:
                    self._umgr.cancel_units(running)
                except Exception as exc2:
                    self._log.error("mapreduce_withdraw_failed", error=repr(exc2)[:300])

    def _start(self, job: Job) -> None:
        task = _Task(("probe", job.id), chunks.probe, (job.paths, self.read_timeout), None)
        with self._cond:
            if job._state != RUNNING:
                return
            task.jobs.add(job)
            self._tasks[task.key] = task
            self._queues.setdefault(job, collections.deque()).append(task)

    def _dispatch(self) -> None:
        """Submit queued tasks, taking the jobs in turn, while the window has room."""
        while True:
            with self._cond:
                batch = []
                room = self.window - len(self._by_uid)
                while room > 0 and self._queues:
                    job, q = next(iter(self._queues.items()))
                    task = q.popleft()
                    del self._queues[job]
                    if q:
                        self._queues[job] = q  # to the back: the next job's turn
                    if task.uid is None and task.jobs:
                        task.uid = ""  # chosen: not chosen again from another job's queue
                        batch.append(task)
                        room -= 1
            if not batch:
                return
            descs = [UnitDescription(function=t.fn, args=t.args,
                                     name=f"mapreduce {t.key[0]} {t.key[1:]}"[:256])
                     for t in batch]
            units = self._umgr.submit_units(descs)
            with self._cond:
                self.units += len(units)
                for t, u in zip(batch, units, strict=True):
                    t.uid = u.uid
                    t.attempts += 1
                    if t.jobs and self._tasks.get(t.key) is t:
                        self._by_uid[u.uid] = t
                    else:  # every job that needed it ended meanwhile
                        self._withdraw.append(u.uid)

    def _collect(self, unit: Any) -> None:
        with self._cond:
            task = self._by_uid.pop(unit.uid, None)
        if task is None:
            return  # withdrawn
        rec = (unit.results or [None])[0]
        if unit.state == states.DONE and rec is not None and rec[0] == calls.OK:
            try:
                value = calls.value(rec)
            except Exception as exc:
                return self._failed(task, f"its result does not unpickle here: {exc!r}", True)
            if task.piece is None:
                self._probed(task, value)
            else:
                self._mapped(task, value)
            return
        if rec is not None and rec[0] == calls.RAISED:
            exc = calls.exception(rec)
            why = f"{type(exc).__name__}: {exc}"
            fatal = type(exc).__name__ in _FATAL
        else:
            why = unit.reason or f"its unit ended {unit.state}"
            fatal = False
        self._failed(task, why, fatal)

    def _failed(self, task: _Task, why: str, fatal: bool) -> None:
        with self._cond:
            if not fatal and task.attempts <= self.retries and task.jobs:
                task.uid = None
                for job in task.jobs:
                    self._queues.setdefault(job, collections.deque()).appendleft(task)
                self._log.warning("mapreduce_task_retry", task=str(task.key)[:200],
                                  attempt=task.attempts, reason=why[:300])
                return
            self._tasks.pop(task.key, None)
            what = "probing the files" if task.piece is None else \
                f"bytes {task.piece[1]}-{task.piece[2]}"
            tries = "" if fatal else f" (after {task.attempts} attempts)"
            for job in list(task.jobs):
                self._end(job, FAILED, f"{what}: {why}{tries}")

    def _probed(self, task: _Task, idents: list[tuple[int, ...]]) -> None:
        with self._cond:
            self._tasks.pop(task.key, None)
            jobs = [j for j in task.jobs if j._state == RUNNING]
        for job in jobs:
            try:
                self._plan(job, idents)
            except MapReduceError as exc:
                with self._cond:
                    self._end(job, FAILED, str(exc))
            except Exception as exc:  # the kind's reduce over cached chunks
                with self._cond:
                    self._end(job, FAILED, f"kind {job.kind!r}: planning raised {exc!r}"[:2000])

    def _plan(self, job: Job, idents: list[tuple[int, ...]]) -> None:
        k = job._kind
        size = max(ident[1] for ident in idents)
        if job.end is None:
            job.end = size
        if job.end > size:
            raise MapReduceError(f"end {job.end} is past the end of the file ({size} bytes)")
        if job.start >= size and job.start > 0:
            raise MapReduceError(f"start {job.start} is at or past the end of the file "
                                 f"({size} bytes)")
        if job.end <= job.start:
            if k.zero is None:
                raise MapReduceError(f"the range {job.start}-{job.end} is empty and kind "
                                     f"{k.name!r} has no zero")
            with self._cond:
                self._answer(job, k.zero, 0, False)
            return
        ckey = f"{k.prefix}_{'_'.join(chunks.file_hash(i) for i in idents)}"
        _, pieces = self.cache.plan(ckey, job.start, job.end, size, self.min_chunk,
                                    self.max_chunk)
        cached_value: Any = None
        cached = 0
        todo = []
        for p in pieces:
            v = self.cache.get(ckey, p.start, p.end) if p.cached else None
            if v is None and p.cached:  # the file went: compute it
                p = p._replace(cached=False)
            if v is not None:
                cached_value = v if cached_value is None else k.reduce(cached_value, v)
                cached += p.end - p.start
            else:
                todo.append(p)
        with self._cond:
            if job._state != RUNNING:
                return
            job._waiting = len(todo)
            if cached or not todo:
                self._answer(job, cached_value if cached else k.zero, cached, True)
            q = self._queues.setdefault(job, collections.deque())
            for p in todo:
                step = max(self.min_chunk, p.level // 8) if p.level else p.end
                key = (ckey, p.start, p.end, step)
                task = self._tasks.get(key)
                if task is None:
                    task = _Task(key, chunks.map_chunk,
                                 (k.map, k.reduce, job.paths, idents, p.start, p.end, step,
                                  self.read_timeout), (ckey, p.start, p.end, p.level))
                    self._tasks[key] = task
                if task.uid is None:  # in every waiting job's queue: whichever comes first
                    q.append(task)
                task.jobs.add(job)
            if not q:
                self._queues.pop(job, None)
            self._cond.notify_all()

    def _mapped(self, task: _Task, subs: list[Any]) -> None:
        ckey, start, end, level = task.piece
        reduce = task.args[1]
        with self._cond:
            self._tasks.pop(task.key, None)
            jobs = [j for j in task.jobs if j._state == RUNNING]
        value = subs[0]
        try:
            for v in subs[1:]:
                value = reduce(value, v)
        except Exception as exc:
            return self._failed(task, f"its reduce raised {exc!r}", True)
        if level:
            try:
                self.cache.put(ckey, start, end, value)
                step = task.key[3]
                if len(subs) > 1:
                    for i, v in enumerate(subs):
                        s = start + i * step
                        self.cache.put(ckey, s, min(end, s + step), v)
            except (OSError, TypeError) as exc:
                self._log.warning("cache_write_failed", error=str(exc)[:300])
        with self._cond:
            for job in jobs:
                if job._state == RUNNING:
                    job._waiting -= 1
                    self._answer(job, value, end - start, False)
