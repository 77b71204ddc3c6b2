"""End-to-end throughput: N x /bin/true units on a local pilot, against raw subprocess spawns.

    python bench/throughput.py [--units 3000] [--cores 8] [--json]

Prints units/s end to end (submit to last DONE) and, measured in the same run before and after
(the better of the two), two baselines: the raw `subprocess.run` spawn rate from 4 threads (the
fastest raw way here), and the same with a directory and stdout/stderr files per process (what
any pilot system gives a unit). Also where the CPU went, in microseconds per unit: this process
(the application and the embedded hub), the agent, its spawner, the units themselves, and the
machine's idle share. Session + pilot start-up is printed apart.

The agent's one spawner is the serial path: ``spawner_posix_spawn_us`` is the wall time its
``posix_spawn`` took a unit (it returns once the child has exec'd), and
``spawner_in_posix_spawn_share`` the share of the run it spent there; the baseline,
``serial_posix_spawn_us``, is the same call in a loop with the machine otherwise quiet.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rpg
from bench._common import CPU, emit, raw_sandbox_spawn_rate, raw_spawn_rate, serial_posix_spawn_us


def run(units: int, cores: int, sandbox: str, nice: dict) -> dict:
    t0 = time.perf_counter()
    with rpg.Session(sandbox=sandbox) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=cores, runtime=30, **nice))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        assert pilot.wait(state="ACTIVE", timeout=30) == "ACTIVE", pilot.reason
        t_active = time.perf_counter() - t0
        cpu = CPU({"agent": "rpg.agent"})
        cpu0, idle0 = cpu.snap(), _idle()
        t1 = time.perf_counter()
        us = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")
                                for _ in range(units)])
        umgr.wait_units(timeout=600)
        dt = time.perf_counter() - t1
        used, idle1 = CPU.since(cpu0, cpu.snap()), _idle()
        done = sum(u.state == "DONE" for u in us)
        loop = session.hub.stats()["loop"]
    spawner = _spawner_stats(sandbox)  # written as the spawner exits, with the session
    names = {"this process": "app_and_hub", "agent": "agent", "agent's children": "spawner",
             "agent's children (reaped)": "units"}
    account = {f"cpu_us_per_unit_{names[k]}": round(v / units * 1e6) for k, v in used.items()
               if k in names}
    account["machine_idle_share"] = round((idle1[0] - idle0[0]) / (idle1[1] - idle0[1]), 3)
    if spawner["spawns"]:
        # The agent's one spawner is the serial path: posix_spawn returns once the child has
        # exec'd, and under load the new child first waits for a core (docs/performance.md).
        account["spawner_posix_spawn_us"] = round(spawner["spawn_s"] / spawner["spawns"] * 1e6)
        account["spawner_in_posix_spawn_share"] = round(spawner["spawn_s"] / dt, 3)
    return {"units": units, "done": done, "seconds": dt, "units_per_s": done / dt, **account,
            "session_to_active_s": t_active, "hub_loop_lag_p99_ms": loop["lag_p99_ms"],
            "hub_loop_blocked_events": loop["blocked_events"]}


def _spawner_stats(sandbox: str) -> dict:
    """The spawners' own account (rpg/agent/spawn_server.py's STATS_FILE), summed."""
    total = {"spawns": 0, "spawn_s": 0.0}
    for path in glob.glob(os.path.join(sandbox, "**", "spawner.*.stats.json"), recursive=True):
        with open(path) as fh:
            st = json.load(fh)
        total["spawns"] += st["spawns"]
        total["spawn_s"] += st["spawn_s"]
    return total


def _idle() -> tuple[float, float]:
    """(idle, all) CPU ticks of the machine so far."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return f[3] + f[4], sum(f)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=3000)
    ap.add_argument("--cores", type=int, default=8)
    ap.add_argument("--unit-nice", type=int, default=None,
                    help="the pilot's unit_nice (default: PilotDescription's)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        raw = raw_spawn_rate()
        serial = serial_posix_spawn_us()
        # Its tree stays until the end: removed here, its freed inodes made the sandboxes of
        # the run measured next cost more (bench/_common.py).
        raw_sandbox = raw_sandbox_spawn_rate(os.path.join(d, "raw"), remove=False)
        nice = {} if a.unit_nice is None else {"unit_nice": a.unit_nice}
        r = run(a.units, a.cores, os.path.join(d, "s"), nice)
        raw = max(raw, raw_spawn_rate())
        serial = min(serial, serial_posix_spawn_us())
        raw_sandbox = max(raw_sandbox, raw_sandbox_spawn_rate(os.path.join(d, "raw2"),
                                                              remove=False))
    r["unit_nice"] = rpg.PilotDescription(**nice).unit_nice
    r["raw_spawn_per_s"] = raw
    r["ratio_vs_raw_spawn"] = r["units_per_s"] / raw
    r["raw_spawn_with_sandbox_files_per_s"] = raw_sandbox
    r["ratio_vs_raw_spawn_with_sandbox_files"] = r["units_per_s"] / raw_sandbox
    r["serial_posix_spawn_us"] = round(serial)  # the spawner's call, with the machine quiet
    if "spawner_posix_spawn_us" in r:
        r["ratio_spawner_call_vs_serial"] = round(r["spawner_posix_spawn_us"] / serial, 2)
    emit("throughput", r, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
