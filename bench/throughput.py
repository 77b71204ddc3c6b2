"""End-to-end throughput: N x /bin/true units on a local pilot, against raw subprocess spawns.

    python bench/throughput.py [--units 2000] [--cores 8] [--json]

Prints units/s end to end (submit to last DONE), the raw `subprocess.run` spawn rate measured in
the same run (4 threads, the fastest raw way here), their ratio, and session + pilot start-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rpg
from bench._common import emit, raw_spawn_rate


def run(units: int, cores: int, sandbox: str) -> dict:
    t0 = time.perf_counter()
    with rpg.Session(sandbox=sandbox) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=cores, runtime=30))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        assert pilot.wait(state="ACTIVE", timeout=30) == "ACTIVE", pilot.reason
        t_active = time.perf_counter() - t0
        t1 = time.perf_counter()
        us = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")
                                for _ in range(units)])
        umgr.wait_units(timeout=600)
        dt = time.perf_counter() - t1
        done = sum(u.state == "DONE" for u in us)
        loop = session.hub.stats()["loop"]
    return {"units": units, "done": done, "seconds": dt, "units_per_s": done / dt,
            "session_to_active_s": t_active, "hub_loop_lag_p99_ms": loop["lag_p99_ms"],
            "hub_loop_blocked_events": loop["blocked_events"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=2000)
    ap.add_argument("--cores", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    raw = raw_spawn_rate()
    with tempfile.TemporaryDirectory() as d:
        r = run(a.units, a.cores, os.path.join(d, "s"))
    raw_after = raw_spawn_rate()
    baseline = max(raw, raw_after)
    r["raw_spawn_per_s"] = baseline
    r["ratio_vs_raw_spawn"] = r["units_per_s"] / baseline
    emit("throughput", r, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
