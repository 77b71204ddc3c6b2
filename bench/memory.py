"""Memory per unit: N units queued on a 1-core pilot, application + hub RSS.

    python bench/memory.py [--units 20000] [--all-done N] [--json]

Submits N units of `sleep 60` to a 1-core pilot (one runs, the pilot's room is bound, the rest
wait for a pilot) and reads the process's RSS, from before the descriptions were made to once
all N are in the hub. The baseline, from the same run (in a fresh process): the RSS the same N
UnitDescription objects take on their own, which any framework must hold. Prints MB per
1,000 units for both and their ratio (the goal in issue 16: <= 5 MB per 1,000 units). With
``--all-done N`` it then runs N `/bin/true` units to DONE in a new session and prints the peak
RSS of application + hub + agent (goal: under 1 GB for 100,000).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rpg
from bench._common import emit


def rss_mb(proc: psutil.Process | None = None) -> float:
    return (proc or psutil.Process()).memory_info().rss / 2**20


def tree_rss_mb() -> float:
    me = psutil.Process()
    total = rss_mb(me)
    for c in me.children(recursive=True):
        try:
            total += rss_mb(c)
        except psutil.Error:
            pass
    return total


def descriptions(n: int, executable: str, args: list[str]) -> list[rpg.UnitDescription]:
    return [rpg.UnitDescription(executable=executable, arguments=list(args)) for _ in range(n)]


BARE = """
import gc, sys, psutil, rpg
n = int(sys.argv[1])
gc.collect()
before = psutil.Process().memory_info().rss
descs = [rpg.UnitDescription(executable="/bin/sleep", arguments=["60"]) for _ in range(n)]
gc.collect()
print((psutil.Process().memory_info().rss - before) / 2**20)
"""


def bare_mb(n: int) -> float:
    """The RSS of N descriptions alone, in a fresh process (so no freed arena is reused)."""
    out = subprocess.run([sys.executable, "-c", BARE, str(n)], check=True, capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(out.stdout.strip())


def queued(n: int, sandbox: str) -> dict:
    bare = bare_mb(n)
    with rpg.Session(sandbox=sandbox) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=1, runtime=300))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        assert pilot.wait(state="ACTIVE", timeout=60) == "ACTIVE", pilot.reason
        gc.collect()
        base = rss_mb()  # what the application makes from here on counts: descriptions too
        units = umgr.submit_units(descriptions(n, "/bin/sleep", ["60"]))
        deadline = time.monotonic() + 120
        while session.hub.call(session.hub.stats)["units"] < n and time.monotonic() < deadline:
            time.sleep(0.2)
        units[0].wait(state="EXECUTING", timeout=60)
        time.sleep(1.0)  # the applier has the bound ones' events
        gc.collect()
        held = rss_mb() - base
        waiting = session.hub.call(session.hub.stats).get("waiting_for_a_pilot")
        umgr.cancel_units()
        umgr.wait_units(timeout=120)
    per_1000 = held / (n / 1000)
    bare_per_1000 = bare / (n / 1000)
    return {"units_queued": n, "waiting_for_a_pilot": waiting,
            "app_hub_mb_per_1000_units": per_1000,
            "bare_descriptions_mb_per_1000": bare_per_1000,
            "ratio_vs_bare_descriptions": per_1000 / bare_per_1000 if bare_per_1000 > 0 else 0.0}


def all_done(n: int, sandbox: str) -> dict:
    peak = tree_rss_mb()
    t0 = time.perf_counter()
    with rpg.Session(sandbox=sandbox) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=4, runtime=3600))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        units = []
        for start in range(0, n, 20000):  # 20,000 is the most one call takes
            units += umgr.submit_units(descriptions(min(20000, n - start), "/bin/true", []))
        while not all(u.final for u in units[-100:]):
            peak = max(peak, tree_rss_mb())
            time.sleep(1.0)
        umgr.wait_units(timeout=600)
        peak = max(peak, tree_rss_mb())
        done = sum(u.state == "DONE" for u in units)
    return {"all_done_units": n, "all_done_done": done,
            "all_done_s": time.perf_counter() - t0,
            "all_done_peak_rss_app_hub_agent_mb": peak}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=20000)
    ap.add_argument("--all-done", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        r = queued(a.units, os.path.join(d, "q"))
        if a.all_done:
            r.update(all_done(a.all_done, os.path.join(d, "d")))
    emit("memory", r, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
