"""The agent's scheduler: free cores and GPUs as numpy free-lists, per node.

``allocate`` pops cores off a node's free stack (O(cores asked), independent of the pilot's
size); ``free`` pushes them back. Waiters are served first come, first served, with a bounded
backfill window so one big unit does not stall small ones behind it forever.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import numpy as np
from gevent.event import AsyncResult

BACKFILL_WINDOW = 64
SMALL_IDS = 64  # format_ids: up to this many ids without numpy


class Slots:
    """Cores and GPUs held by one unit on one node."""

    __slots__ = ("node", "cores", "gpus")

    def __init__(self, node: int, cores: np.ndarray, gpus: np.ndarray) -> None:
        self.node = node
        self.cores = cores
        self.gpus = gpus


def format_ids(ids: np.ndarray | Sequence[int]) -> str:
    """Ids as sorted ranges, ``[0, 1, 2, 3, 8, 10, 11]`` -> ``"0-3,8,10-11"``.

    RPG_CORES lists a unit's cores this way: one id each would make a 1,000,000-core unit's
    variable several MB, past the 128 KiB a single environment string may have (E2BIG).
    """
    if len(ids) <= SMALL_IDS:  # the usual unit: plain Python is 10x faster than numpy's steps
        return _format_small(sorted({int(i) for i in
                                     (ids.tolist() if isinstance(ids, np.ndarray) else ids)}))
    a = np.sort(np.asarray(ids, dtype=np.int64))  # np.unique is 50x slower on 1M ids
    if len(a) == 0:
        return ""
    step = np.diff(a)
    if not step.all():  # drop repeats
        a = a[np.concatenate(([True], step != 0))]
        step = np.diff(a)
    breaks = np.flatnonzero(step != 1)
    starts = a[np.concatenate(([0], breaks + 1))].tolist()
    ends = a[np.concatenate((breaks, [len(a) - 1]))].tolist()
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}"
                    for lo, hi in zip(starts, ends, strict=True))


def _format_small(ids: list[int]) -> str:
    out: list[str] = []
    i, n = 0, len(ids)
    while i < n:
        j = i
        while j + 1 < n and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


class _Stack:
    def __init__(self, n: int) -> None:
        self.ids = np.arange(n - 1, -1, -1, dtype=np.int64)  # lowest id on top
        self.top = n

    def pop(self, k: int) -> np.ndarray:
        self.top -= k
        return self.ids[self.top:self.top + k][::-1].copy()

    def push(self, ids: np.ndarray) -> None:
        k = len(ids)
        self.ids[self.top:self.top + k] = ids[::-1]
        self.top += k


class Scheduler:
    def __init__(self, nodes: Sequence[tuple[str, int, int]]) -> None:
        if not nodes:
            raise ValueError("scheduler: at least one node is needed")
        self.node_names = [n[0] for n in nodes]
        self.total_cores = np.array([n[1] for n in nodes], dtype=np.int64)
        self.total_gpus = np.array([n[2] for n in nodes], dtype=np.int64)
        self.free_cores = self.total_cores.copy()
        self.free_gpus = self.total_gpus.copy()
        self._cores = [_Stack(int(n)) for n in self.total_cores]
        self._gpus = [_Stack(int(n)) for n in self.total_gpus]
        self._waiters: deque[list[Any]] = deque()  # [cores, gpus, AsyncResult]
        self._fits: dict[tuple[int, int], bool] = {}
        self._hint = 0

    def fits_ever(self, cores: int, gpus: int) -> bool:
        key = (cores, gpus)
        fits = self._fits.get(key)
        if fits is None:
            fits = self._fits[key] = bool(
                np.any((self.total_cores >= cores) & (self.total_gpus >= gpus)))
        return fits

    def try_allocate(self, cores: int, gpus: int) -> Slots | None:
        node = self._hint  # the node that served last time usually has room again
        if not (self.free_cores[node] >= cores and self.free_gpus[node] >= gpus):
            ok = np.flatnonzero((self.free_cores >= cores) & (self.free_gpus >= gpus))
            if len(ok) == 0:
                return None
            node = self._hint = int(ok[0])
        self.free_cores[node] -= cores
        self.free_gpus[node] -= gpus
        return Slots(node, self._cores[node].pop(cores), self._gpus[node].pop(gpus))

    def allocate(self, cores: int, gpus: int = 0) -> Slots:
        """Cores and GPUs on one node; waits (cooperatively) in line until they are free."""
        got = self.request(cores, gpus)
        if isinstance(got, Slots):
            return got
        try:
            return got[2].get()
        except BaseException:
            self.leave(got)
            raise

    def request(self, cores: int, gpus: int = 0) -> Slots | list[Any]:
        """Cores and GPUs now, or, without waiting, a place in line: a waiter whose
        AsyncResult (``waiter[2]``) gets them in turn. One who gives up calls ``leave``."""
        if not self._waiters:
            slots = self.try_allocate(cores, gpus)
            if slots is not None:
                return slots
        waiter = [cores, gpus, AsyncResult()]
        self._waiters.append(waiter)
        return waiter

    def leave(self, waiter: list[Any]) -> None:
        """Give up a place in line; cores already granted to it go back."""
        if waiter[2].ready():
            self.free(waiter[2].value)
        else:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def free(self, slots: Slots) -> None:
        n = slots.node
        self._cores[n].push(slots.cores)
        self._gpus[n].push(slots.gpus)
        self.free_cores[n] += len(slots.cores)
        self.free_gpus[n] += len(slots.gpus)
        if self._waiters:
            self._serve()

    def _serve(self) -> None:
        checked = 0
        waiters = self._waiters
        i = 0
        while i < len(waiters) and checked < BACKFILL_WINDOW:
            cores, gpus, result = waiters[i]
            slots = self.try_allocate(cores, gpus)
            if slots is None:
                i += 1
                checked += 1
                if self.free_cores.max() == 0:
                    break
                continue
            del waiters[i]
            result.set(slots)
