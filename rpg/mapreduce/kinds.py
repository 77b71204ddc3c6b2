"""The statistics MapReduce computes: each kind is a (map, reduce) pair over byte blocks.

``map(*blocks)`` gets one ``numpy.uint8`` array per file (the same byte range of each; a file
that ends early gives a shorter array) and returns a partial result; ``reduce(a, b)`` combines
two partials into a new one (associative and commutative, as chunks finish in any order; it
must not change its arguments, which other jobs may share); ``finish``
turns the reduced partial of a range into the answer. Partials are cached as ``.npy`` files, so
they must be numbers or numpy arrays (no objects: a cache never unpickles). Kinds with the same
``prefix`` and ``map`` share chunk files and in-flight chunk work: ``entropy`` is computed from
``HIST_`` chunks, so a histogram and an entropy of one file never read it twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

BINS = 256
_PREFIX = re.compile(r"[A-Z][A-Z0-9]{0,15}\Z")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")


@dataclass(frozen=True)
class Kind:
    """One statistic. ``files`` is how many files a request names (1, or 2 for a diff)."""

    name: str
    map: Callable[..., Any]
    reduce: Callable[[Any, Any], Any]
    finish: Callable[[Any], Any]
    zero: Any
    files: int
    prefix: str


def hist_map(block: np.ndarray) -> np.ndarray:
    return np.bincount(block, minlength=BINS)


def hist_reduce(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def hist_finish(h: np.ndarray) -> np.ndarray:
    return np.array(h, dtype=np.int64)  # a copy: the answer is the caller's to change


def entropy_finish(h: np.ndarray) -> float:
    """Shannon entropy in bits per byte of a byte histogram (0.0 for an empty one)."""
    total = int(h.sum())
    if total == 0:
        return 0.0
    p = h[h > 0] / total
    return float(-(p * np.log2(p)).sum())


def diff_map(a: np.ndarray, b: np.ndarray) -> int:
    """Differing bytes; a byte that only one file has (the other ended) counts as differing."""
    n = min(len(a), len(b))
    return int(np.count_nonzero(a[:n] != b[:n])) + abs(len(a) - len(b))


def diff_reduce(a: int, b: int) -> int:
    return int(a) + int(b)


BUILTIN: dict[str, Kind] = {
    "hist": Kind("hist", hist_map, hist_reduce, hist_finish, np.zeros(BINS, np.int64), 1,
                 "HIST"),
    "entropy": Kind("entropy", hist_map, hist_reduce, entropy_finish,
                    np.zeros(BINS, np.int64), 1, "HIST"),
    "diff": Kind("diff", diff_map, diff_reduce, int, 0, 2, "DIFF"),
}


def make_kind(name: str, map: Callable[..., Any], reduce: Callable[[Any, Any], Any],
              finish: Callable[[Any], Any] | None = None, zero: Any = None, files: int = 1,
              prefix: str | None = None) -> Kind:
    """A validated Kind (``MapReduce.register``'s arguments), each error naming its field."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"register: name must be 1-32 of a-z, 0-9, _ (starting with a letter), "
                         f"got {name!r}")
    for field, fn in (("map", map), ("reduce", reduce), ("finish", finish)):
        if fn is not None and not callable(fn):
            raise TypeError(f"register: {field} must be callable, got {fn!r}")
    if map is None or reduce is None:
        raise TypeError("register: map and reduce are required")
    if isinstance(files, bool) or files not in (1, 2):
        raise ValueError(f"register: files must be 1 or 2, got {files!r}")
    prefix = name.upper() if prefix is None else prefix
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise ValueError(f"register: prefix must be 1-16 of A-Z, 0-9 (starting with a letter), "
                         f"got {prefix!r}")
    if zero is not None:
        z = np.asarray(zero)
        if z.dtype == object:
            raise TypeError(f"register: zero must be a number or numpy array, got {zero!r}")
    return Kind(name, map, reduce, finish if finish is not None else (lambda v: v), zero,
                files, prefix)
