"""The chunk cache: one ``.npy`` file per chunk result in ``cache_dir``, named as in binglide,
``<PREFIX>_<filehash>[_<filehash2>].<start>_<end>`` (``HIST_3f2a….0_67108864``), and the plan
that covers a request with cached chunks and chunks to compute.

Chunks sit on a dyadic grid: a chunk of size S starts at a multiple of S (the last one of a
file ends at the file's end). A request is cut on the grid of its own scale (about an eighth of
its length, between ``min_chunk`` and ``max_chunk``); a computed chunk also returns its eighths,
which are cached too, so later and smaller requests in the same place find both levels (the
seed's "10 % and 1 %"). Uncached parts that are not whole grid chunks are the request's edges:
they are cut on finer grids down to ``min_chunk``, and what is left below that is computed
exactly and not cached. The index lives in memory (built from the directory at start); the
least recently used files go when the directory passes ``limit`` bytes. Files are written to a
temporary name and renamed, so a reader never sees half of one, and read with
``allow_pickle=False``: a cache directory never runs code.
"""

from __future__ import annotations

import bisect
import collections
import os
import re
import stat
import tempfile
import time
from typing import Any, NamedTuple

import numpy as np

from rpg.log import get_logger

_NAME = re.compile(r"([A-Z][A-Z0-9]*)_([0-9a-f_]+)\.(\d+)_(\d+)\.npy\Z")


class Piece(NamedTuple):
    """A part of a request: cached (its value read), a grid chunk to compute, or an edge."""

    start: int
    end: int
    cached: bool
    level: int  # the grid size of a whole grid chunk (cached when computed); 0: an edge


def chunk_name(prefix: str, hashes: tuple[str, ...], start: int, end: int) -> str:
    return f"{prefix}_{'_'.join(hashes)}.{start}_{end}.npy"


class ChunkCache:
    """The cache files of one directory (thread-safe: call it from one coordinator thread)."""

    def __init__(self, cache_dir: str, limit: int) -> None:
        self.dir = os.path.abspath(cache_dir)
        self.limit = limit
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        st = os.stat(self.dir)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise PermissionError(
                f"MapReduce: cache_dir {self.dir} must be owned by you and not writable by "
                f"others (mode {oct(st.st_mode & 0o777)}): its files are trusted results")
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()  # name->bytes
        self._spans: dict[str, list[tuple[int, int]]] = {}  # "PREFIX_hashes" -> sorted spans
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evicted = 0
        self._log = get_logger("mapreduce.cache", dir=self.dir)
        found = []
        old_tmp = time.time() - 3600
        for entry in os.scandir(self.dir):
            try:
                st = entry.stat(follow_symlinks=False)
                if entry.name.startswith(".tmp-") and st.st_mtime < old_tmp:
                    os.unlink(entry.path)  # left by a writer that was killed
                elif _NAME.match(entry.name) and stat.S_ISREG(st.st_mode):
                    found.append((st.st_mtime_ns, entry.name, st.st_size))
            except FileNotFoundError:
                pass  # another process evicted it meanwhile
        for _, name, size in sorted(found):  # oldest first: the LRU order survives a restart
            self._add(name, size)

    # -- index -----------------------------------------------------------------------------------

    @staticmethod
    def _split(name: str) -> tuple[str, int, int]:
        m = _NAME.match(name)
        assert m is not None
        return f"{m.group(1)}_{m.group(2)}", int(m.group(3)), int(m.group(4))

    def _add(self, name: str, size: int) -> None:
        if name in self._lru:
            self.bytes -= self._lru.pop(name)
        else:
            key, s, e = self._split(name)
            bisect.insort(self._spans.setdefault(key, []), (s, e))
        self._lru[name] = size
        self.bytes += size

    def _drop(self, name: str) -> None:
        size = self._lru.pop(name, None)
        if size is None:
            return
        self.bytes -= size
        key, s, e = self._split(name)
        spans = self._spans.get(key, [])
        i = bisect.bisect_left(spans, (s, e))
        if i < len(spans) and spans[i] == (s, e):
            del spans[i]

    def has(self, key: str, start: int, end: int) -> bool:
        spans = self._spans.get(key)
        if not spans:
            return False
        i = bisect.bisect_left(spans, (start, end))
        return i < len(spans) and spans[i] == (start, end)

    def any_inside(self, key: str, start: int, end: int) -> bool:
        spans = self._spans.get(key)
        if not spans:
            return False
        i = bisect.bisect_left(spans, (start, -1))
        while i < len(spans) and spans[i][0] < end:
            if spans[i][1] <= end:
                return True
            i += 1
        return False

    # -- files -----------------------------------------------------------------------------------

    def get(self, key: str, start: int, end: int) -> Any:
        """The cached value, or None (a missing or unreadable file is forgotten)."""
        name = f"{key}.{start}_{end}.npy"
        path = os.path.join(self.dir, name)
        try:
            value = np.load(path, allow_pickle=False)
        except Exception as exc:  # missing, torn (EOFError), not an array: recompute it
            self.misses += 1
            self._drop(name)
            self._log.info("cache_unreadable", file=name, error=str(exc)[:200])
            return None
        self.hits += 1
        self._lru.move_to_end(name)
        try:
            os.utime(path)  # the LRU order, for the next process that indexes this directory
        except OSError:
            pass
        return value[()] if value.ndim == 0 else value

    def put(self, key: str, start: int, end: int, value: Any) -> None:
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError(f"a chunk result must be a number or numpy array, got "
                            f"{type(value).__name__}")
        name = f"{key}.{start}_{end}.npy"
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
                size = fh.tell()
            os.replace(tmp, os.path.join(self.dir, name))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._add(name, size)
        while self.bytes > self.limit and len(self._lru) > 1:
            old = next(iter(self._lru))
            self._drop(old)
            self.evicted += 1
            try:
                os.unlink(os.path.join(self.dir, old))
            except OSError:
                pass

    # -- the plan --------------------------------------------------------------------------------

    def plan(self, key: str, start: int, end: int, size: int, min_chunk: int,
             max_chunk: int) -> tuple[int, list[Piece]]:
        """(grid size, pieces covering [start, end)) for a file (or pair) of ``size`` bytes."""
        grid = min_chunk
        while grid * 2 <= max_chunk and grid * 2 * 8 <= end - start:
            grid *= 2
        pieces: list[Piece] = []
        first = start // grid * grid
        for s in range(first, end, grid):
            self._cover(key, s, grid, start, end, size, min_chunk, pieces)
        return grid, pieces

    def _cover(self, key: str, s: int, g: int, a: int, b: int, size: int, min_chunk: int,
               out: list[Piece]) -> None:
        e = min(s + g, size)
        if e <= a or s >= b or s >= size:
            return
        whole = a <= s and e <= b
        if whole and self.has(key, s, e):
            out.append(Piece(s, e, True, g))
        elif whole and (g <= min_chunk or not self.any_inside(key, s, e)):
            out.append(Piece(s, e, False, g))
        elif g <= min_chunk:
            out.append(Piece(max(a, s), min(b, e), False, 0))
        else:
            half = g // 2
            self._cover(key, s, half, a, b, size, min_chunk, out)
            self._cover(key, s + half, half, a, b, size, min_chunk, out)
