"""Function calls: rpg.Executor against concurrent.futures.ProcessPoolExecutor, same run.

    python bench/functions.py [--calls 10000] [--items 1000000] [--units 1000] [--json]

Prints: ``--calls`` no-op calls through ``Executor(cores=2).submit`` (one submit each) against
``ProcessPoolExecutor(2).submit``; ``map`` over ``--items`` with chunksize 64 against
``ProcessPoolExecutor(2).map``; and ``--units`` function units through the unit API against
the same number of /bin/true executable units (units/s). Each with its ratio.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rpg
from bench._common import emit


def noop(x):
    return x


def submit_rate(ex: cf.Executor, n: int) -> float:
    t = time.perf_counter()
    fs = [ex.submit(noop, i) for i in range(n)]
    for f in fs:
        f.result()
    return n / (time.perf_counter() - t)


def map_rate(ex: cf.Executor, n: int) -> float:
    t = time.perf_counter()
    count = sum(1 for _ in ex.map(noop, range(n), chunksize=64))
    assert count == n
    return n / (time.perf_counter() - t)


def units_rate(umgr: rpg.UnitManager, descs: list) -> float:
    t = time.perf_counter()
    us = umgr.submit_units(descs)
    umgr.wait_units(us, timeout=600)
    assert all(u.state == "DONE" for u in us), {u.reason for u in us}
    return len(us) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--units", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with cf.ProcessPoolExecutor(2) as pp:
        submit_rate(pp, 200)  # workers up
        pp_submit = submit_rate(pp, a.calls)
        pp_map = map_rate(pp, a.items)
    with rpg.Executor(cores=2) as ex:
        submit_rate(ex, 200)  # pilot and workers up
        rpg_submit = submit_rate(ex, a.calls)
        rpg_map = map_rate(ex, a.items)
    with tempfile.TemporaryDirectory() as d, rpg.Session(sandbox=d) as s:
        pilot = rpg.PilotManager(s).submit_pilots(rpg.PilotDescription(cores=2, runtime=30))
        umgr = rpg.UnitManager(s)
        umgr.add_pilots(pilot)
        units_rate(umgr, [rpg.UnitDescription(function=noop, args=(1,)) for _ in range(50)])
        fn_units = units_rate(umgr, [rpg.UnitDescription(function=noop, args=(i,))
                                     for i in range(a.units)])
        exe_units = units_rate(umgr, [rpg.UnitDescription(executable="/bin/true")
                                      for _ in range(a.units)])
    emit("functions", {
        "executor_submit_per_s": rpg_submit, "ppe_submit_per_s": pp_submit,
        "submit_ratio": rpg_submit / pp_submit,
        "executor_map_items_per_s": rpg_map, "ppe_map_items_per_s": pp_map,
        "map_ratio": rpg_map / pp_map,
        "function_units_per_s": fn_units, "executable_units_per_s": exe_units,
        "function_vs_executable_units": fn_units / exe_units,
    }, a.json)


if __name__ == "__main__":
    main()
