"""rpg.MapReduce against the best single process, same run.

    python bench/mapreduce.py [--mib 1024] [--cores 2] [--sweep 100] [--json]

Prints: a cold ``--mib`` MiB byte histogram (empty cache, warm workers, the file in the page
cache) in MiB/s against one process reading 1 MiB blocks and adding ``numpy.bincount`` of each
(best of 3), with the ratio; the first-answer latency of a fully cached 256 MiB range (median
of 5); and a sweep of ``--sweep`` overlapping sub-range requests: chunk units run, cache hits,
and its time against the same sweep with the cache cleared before each request.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rpg
from bench._common import emit

MIB = 1 << 20


def baseline(path: str) -> float:
    """MiB/s of the best single process: 1 MiB reads, numpy.bincount of each, summed."""
    t = time.perf_counter()
    h = np.zeros(256, np.int64)
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(MIB)
        while n := fh.readinto(buf):
            h += np.bincount(np.frombuffer(buf, np.uint8, n), minlength=256)
    return os.path.getsize(path) / MIB / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--sweep", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="rpg-bench-mr-")
    path = os.path.join(work, "data.bin")
    try:
        rng = np.random.default_rng(0)
        with open(path, "wb") as fh:
            for _ in range(args.mib // 64):
                fh.write(rng.integers(0, 256, 64 * MIB, dtype=np.uint8).tobytes())
        base = max(baseline(path) for _ in range(3))
        cache = os.path.join(work, "cache")
        with rpg.Session(sandbox=os.path.join(work, "session")) as s:
            pilot = rpg.PilotManager(s).submit_pilots(
                rpg.PilotDescription(cores=args.cores, runtime=60))
            with rpg.MapReduce(s, [pilot], cache) as mr:
                mr.submit("hist", path, 0, 8 * MIB).result(120)  # start the workers
                shutil.rmtree(cache)
                mr.cache.__init__(cache, mr.cache.limit)  # an empty cache
                t = time.perf_counter()
                mr.submit("hist", path).result(600)
                cold = args.mib / (time.perf_counter() - t)

                firsts = []
                for _ in range(5):
                    t = time.perf_counter()
                    a = next(mr.submit("hist", path, 128 * MIB, 384 * MIB).answers(60))
                    firsts.append(time.perf_counter() - t)
                    assert a.from_cache and a.final
                warm = statistics.median(firsts)

                size = os.path.getsize(path)
                rng = np.random.default_rng(1)
                spans = []
                for _ in range(args.sweep):
                    a = int(rng.integers(0, size - 64 * MIB))
                    spans.append((a, a + int(rng.integers(MIB, 64 * MIB))))
                units, hits = mr.units, mr.cache.hits
                t = time.perf_counter()
                for a, b in spans:
                    mr.submit("hist", path, a, b).result(120)
                sweep_s = time.perf_counter() - t
                sweep_units, sweep_hits = mr.units - units - args.sweep, mr.cache.hits - hits
            with rpg.MapReduce(s, [pilot], os.path.join(work, "nocache"), cache_limit=0) as mr:
                t = time.perf_counter()
                for a, b in spans:
                    mr.submit("hist", path, a, b).result(120)
                nocache_s = time.perf_counter() - t
        emit("mapreduce", {
            "cold hist MiB/s": cold,
            "single process MiB/s (best of 3)": base,
            "ratio": cold / base,
            "warm first answer, 256 MiB (s)": warm,
            f"sweep of {args.sweep}: seconds": sweep_s,
            "sweep: chunk units": sweep_units,
            "sweep: cached chunks used": sweep_hits,
            "sweep without cache: seconds": nocache_s,
            "sweep speedup from the cache": nocache_s / sweep_s,
        }, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
