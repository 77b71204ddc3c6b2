"""Late binding: units go where capacity is, as pilots join.

    python bench/late_binding.py [--units 1000] [--sleep 0.05] [--small 2] [--big 8]
                                 [--join-after 1.0] [--json]

N units of `sleep S` are submitted while only a small pilot runs; a bigger pilot is submitted
and joins the unit manager ``--join-after`` seconds later. The baseline, from the same run, is
the ideal makespan for the cores as they came: the small pilot's cores from submit, both
pilots' cores from the moment the big one was ACTIVE (its bootstrap measured here), with no
overhead at all. Prints the makespan, the ideal, their ratio (goal <= 1.3; with binding at
submit it was 4.3), and how many units each pilot ran.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rpg
from bench._common import emit


def ideal_makespan(work: float, small: int, big: int, joined: float, sleep: float) -> float:
    """Core-seconds ``work`` on ``small`` cores from 0 and ``small + big`` from ``joined``."""
    if work <= small * joined:
        return max(work / small, sleep)
    return joined + (work - small * joined) / (small + big)


def run(n: int, sleep: float, small: int, big: int, join_after: float, sandbox: str) -> dict:
    with rpg.Session(sandbox=sandbox) as session:
        pmgr = rpg.PilotManager(session)
        p1 = pmgr.submit_pilots(rpg.PilotDescription(cores=small, runtime=120))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(p1)
        assert p1.wait(state="ACTIVE", timeout=60) == "ACTIVE", p1.reason
        t0 = time.time()
        us = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep",
                                                    arguments=[f"{sleep:g}"])
                                for _ in range(n)])
        time.sleep(max(0.0, join_after - (time.time() - t0)))
        p2 = pmgr.submit_pilots(rpg.PilotDescription(cores=big, runtime=120))
        umgr.add_pilots(p2)
        umgr.wait_units(timeout=600)
        makespan = max(ts for u in us for st, ts in u.history if st == u.state) - t0
        active = [ts for st, ts in p2.history if st == "ACTIVE"]
        joined = active[0] - t0 if active else makespan
        done = sum(u.state == "DONE" for u in us)
        on_big = sum(u.pilot == p2.uid for u in us)
        hub_lag = session.hub.stats()["loop"]["lag_p99_ms"]
    ideal = ideal_makespan(n * sleep, small, big, joined, sleep)
    return {"units": n, "done": done, "makespan_s": makespan, "big_pilot_active_after_s": joined,
            "ideal_makespan_s": ideal, "ratio_vs_ideal": makespan / ideal,
            "units_on_small_pilot": n - on_big, "units_on_big_pilot": on_big,
            "hub_loop_lag_p99_ms": hub_lag}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=1000)
    ap.add_argument("--sleep", type=float, default=0.05)
    ap.add_argument("--small", type=int, default=2)
    ap.add_argument("--big", type=int, default=8)
    ap.add_argument("--join-after", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        r = run(a.units, a.sleep, a.small, a.big, a.join_after, os.path.join(d, "s"))
    emit("late_binding", r, a.json)
    return 0 if r["done"] == r["units"] else 1


if __name__ == "__main__":
    sys.exit(main())
