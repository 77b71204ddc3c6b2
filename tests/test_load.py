"""Load: a cancel storm over 10,000 units in flight, and 20,000 units in one submit call (the
most one call of the service protocol takes; it was 50,000, 100 s of the suite's 15 minutes).
Bounded in count and time; each prints its numbers."""

from __future__ import annotations

import resource
import time

import psutil
import pytest

import rpg


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def test_cancel_storm_of_10000_units(tmp_path):
    n = 10_000
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=n, runtime=10, kill_grace=1.0))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        assert pilot.wait(state="ACTIVE", timeout=30) == "ACTIVE", pilot.reason
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["120"])
                                   for _ in range(n)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # let a good share of them be running
            running = sum(u.state == "EXECUTING" for u in units)
            if running >= 1000:
                break
            time.sleep(0.2)
        by_state: dict[str, int] = {}
        for u in units:
            by_state[u.state] = by_state.get(u.state, 0) + 1
        t0 = time.monotonic()
        umgr.cancel_units()
        cancel_call = time.monotonic() - t0
        states = umgr.wait_units(timeout=180)
        settled = time.monotonic() - t0
        canceled = states.count("CANCELED")
        lost = sum(1 for s in states if s not in rpg.FINAL)
        assert pilot.state == "ACTIVE"
    print(f"\ncancel storm: {n} units in flight {by_state}; cancel_units() returned in "
          f"{cancel_call * 1e3:.1f} ms; all final after {settled:.1f} s; "
          f"CANCELED {canceled}, lost {lost}")
    assert running >= 1000
    assert cancel_call < 0.5
    assert canceled == n and lost == 0


@pytest.mark.timeout(600)
def test_20000_units_in_one_call(tmp_path):
    n = 20_000
    rss0 = rss_mb()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=8, runtime=15))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        t0 = time.monotonic()
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")
                                   for _ in range(n)])
        submit = time.monotonic() - t0
        samples = []
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            samples.append(rss_mb())
            if all(u.final for u in units[-100:]) and all(u.final for u in units):
                break
            time.sleep(1.0)
        states = umgr.wait_units(timeout=60)
        took = time.monotonic() - t0
    peak = max(max(samples), rss0)
    done = states.count("DONE")
    per_1000 = (peak - rss0) / (n / 1000)
    print(f"\n20k units: submit() took {submit:.2f} s, all final after {took:.1f} s "
          f"({n / took:.0f} units/s); DONE {done}; application+hub RSS {rss0:.0f} -> peak "
          f"{peak:.0f} MB = {per_1000:.2f} MB per 1,000 units "
          f"(ru_maxrss before {peak0:.0f} MB)")
    assert done == n
    assert per_1000 < 20, "hub memory per unit is not bounded"
