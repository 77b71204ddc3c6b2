"""Scheduler allocate/free cost against pilot size: it must not grow with the core count.

    python bench/scheduler.py [--json]

Baseline: the same allocate/free cycle on a 1,000-core pilot, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import emit
from rpg.agent.scheduler import Scheduler


def cycle_rate(cores: int, n: int = 20000, per_unit: int = 1) -> float:
    s = Scheduler([("n0", cores, 0)])
    held = []
    t0 = time.perf_counter()
    for _ in range(n):
        held.append(s.try_allocate(per_unit, 0))
        if len(held) >= min(cores // per_unit, 512):
            for slots in held:
                s.free(slots)
            held.clear()
    for slots in held:
        s.free(slots)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    base = cycle_rate(1000)
    r = {"alloc_free_per_s_1k_cores": base}
    for cores in (10_000, 100_000):
        rate = cycle_rate(cores)
        r[f"alloc_free_per_s_{cores // 1000}k_cores"] = rate
        r[f"ratio_{cores // 1000}k_vs_1k"] = rate / base
    nodes = Scheduler([(f"n{i}", 128, 0) for i in range(800)])  # 102,400 cores on 800 nodes
    t0 = time.perf_counter()
    for _ in range(5000):
        nodes.free(nodes.try_allocate(16, 0))
    r["alloc_free_per_s_800_nodes_x128"] = 5000 / (time.perf_counter() - t0)
    emit("scheduler", r, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
