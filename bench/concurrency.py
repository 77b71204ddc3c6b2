"""Many concurrent sleeping units: K units of `sleep S` on a pilot with K (virtual) cores.

    python bench/concurrency.py [--units 10000] [--sleep 90] [--collector python|rpg]
                                [--unit-nice N] [--json]

Prints the time until all K are EXECUTING and until all are CANCELED after a 2 s hold, hub and
agent loop-lag p99 (from their loop watches: over the whole run, and by phase: from submit to
all EXECUTING, the 2 s hold, the cancel),
loop-blocked events, hub and agent peak RSS, and the CPU each of the application
(with the embedded hub), the agent and its spawner spent per unit until all were EXECUTING.
Baseline for the spawn phase: the raw subprocess spawn rate from the same run.

``--unit-nice 0`` runs the units at the loops' own priority (the A/B of the pilot's default
``unit_nice``, 19). ``--collector rpg``: this process (the application, with the embedded
hub) opts in to ``rpg.gc_policy`` (full collections when the hub is quiet); ``python``
(default): CPython's own.
The agent's process runs the policy either way.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import rpg
from bench._common import CPU, emit, raw_spawn_rate
from rpg import gc_policy
from rpg.io_pool.loop_watch import lag_window


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=10000)
    ap.add_argument("--sleep", type=float, default=90.0)
    ap.add_argument("--collector", choices=("python", "rpg"), default="python")
    ap.add_argument("--unit-nice", type=int, default=None,
                    help="the pilot's unit_nice (default: PilotDescription's)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.collector == "rpg":
        gc_policy.install()
    full = [0]  # this process's full collections while the units start and run
    gc.callbacks.append(lambda phase, info: full.__setitem__(0, full[0] + (
        phase == "stop" and info["generation"] == 2)))
    raw = raw_spawn_rate()
    k = a.units
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with rpg.Session(sandbox=os.path.join(d, "s")) as session:
            pmgr = rpg.PilotManager(session)
            nice = {} if a.unit_nice is None else {"unit_nice": a.unit_nice}
            pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=k, runtime=30, **nice))
            umgr = rpg.UnitManager(session)
            umgr.add_pilots(pilot)
            assert pilot.wait(state="ACTIVE", timeout=30) == "ACTIVE", pilot.reason
            cpu = CPU({"agent": "rpg.agent"})
            cpu0 = cpu.snap()
            t1 = time.perf_counter()
            units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep",
                                                           arguments=[str(a.sleep)])
                                       for _ in range(k)])
            umgr.wait_units(state="EXECUTING", timeout=600)
            t_exec = time.perf_counter() - t1
            used = CPU.since(cpu0, cpu.snap())
            executing = sum(u.state == "EXECUTING" for u in units)
            time.sleep(2.0)  # the loops under the full load, for a moment
            t2 = time.perf_counter()
            umgr.cancel_units()
            umgr.wait_units(timeout=600)
            t3 = time.perf_counter()
            t_cancel = t3 - t2
            hub = session.hub.stats()["loop"]  # over the same span as the agent's: cancel too
            hub_ticks = session.hub.watch.ticks()
            canceled = sum(u.state == "CANCELED" for u in units)
            sandbox = pilot.sandbox or os.path.join(d, "s", pilot.uid)
        t_total = time.perf_counter() - t0
        with open(os.path.join(d, "s", pilot.uid, "agent.stats.json")) as fh:
            agent = json.load(fh)
        agent_ticks = np.load(os.path.join(d, "s", pilot.uid, "agent.loop_ticks.npy"))
    # The loops' lag by phase (their ticks cut by this process's clock): while the units start
    # (submit to all EXECUTING), while they all run (the hold), while they are canceled.
    phases = {"start": (t1, t1 + t_exec), "hold": (t1 + t_exec, t2), "cancel": (t2, t3)}
    by_phase = {f"{who}_loop_lag_p99_ms_{name}": lag_window(ticks, *span)["lag_p99_ms"]
                for name, span in phases.items()
                for who, ticks in (("hub", hub_ticks), ("agent", agent_ticks))}
    r = {
        "units": k,
        "executing_at_once": executing,
        "time_to_all_executing_s": t_exec,
        "spawn_rate_per_s": k / t_exec,
        "raw_spawn_per_s": raw,
        "ratio_vs_raw_spawn": k / t_exec / raw,
        # CPU until all were EXECUTING, per unit (the units' own: sleep's start-up)
        **{f"cpu_us_per_unit_{n}": round(used[k_] / k * 1e6) for k_, n in
           (("this process", "app_and_hub"), ("agent", "agent"),
            ("agent's children", "spawner")) if k_ in used},
        "hub_loop_lag_p99_ms": hub["lag_p99_ms"],
        **by_phase,
        "hub_loop_blocked_events": hub["blocked_events"],
        "app_collector": a.collector,
        "unit_nice": pilot.description.unit_nice,
        "app_full_collections": full[0],
        "agent_loop_lag_p99_ms": agent["loop"]["lag_p99_ms"],
        "agent_loop_blocked_events": agent["loop"]["blocked_events"],
        "hub_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "agent_peak_rss_mb": agent["peak_rss_mb"],
        "agent_full_collections": (agent.get("gc") or {}).get("full_collections"),
        "canceled_after": canceled,
        "time_to_all_canceled_s": t_cancel,
        "total_s": t_total,
        "sandbox": sandbox,
    }
    emit("concurrency", r, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
