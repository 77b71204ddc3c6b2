"""What an idle session costs: CPU a second of the application (with its embedded hub) and of
an ACTIVE local pilot's agent while no unit is held.

    python bench/idle.py [--seconds 20] [--json]

A session and a 2-core local pilot are started and left alone; their CPU (user + system, all
threads) and voluntary context switches (wake-ups) are read over ``--seconds``. The baseline,
measured first in the same run, as long: a bare gevent process whose loop does nothing but
sleep 10 ms at a time, what one loop-lag ticker alone costs (rpg's loops ticked every 10 ms
while idle until issue 16's stop 35; now they rest at 100 ms ticks while they hold no unit).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rpg
from bench._common import CPU, emit

TICKER = "import gevent\nwhile True:\n    gevent.sleep(0.01)\n"


def switches(proc: psutil.Process) -> int:
    return sum(psutil.Process(t.id).num_ctx_switches().voluntary for t in proc.threads())


def bare_ticker(seconds: float) -> tuple[float, float]:
    """(CPU ms a second, wake-ups a second) of a process whose gevent loop only sleeps 10 ms at
    a time, measured alone (not beside the session: each one's wake-ups change the other's)."""
    proc = subprocess.Popen([sys.executable, "-c", TICKER])
    try:
        time.sleep(1.0)
        cpu = CPU({"ticker": "gevent.sleep(0.01)"})
        c0, s0, t0 = cpu.snap(), switches(psutil.Process(proc.pid)), time.perf_counter()
        time.sleep(seconds)
        dt = time.perf_counter() - t0
        used = CPU.since(c0, cpu.snap())["ticker"]
        return used / dt * 1000, (switches(psutil.Process(proc.pid)) - s0) / dt
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r: dict = {}
    r["bare_ticker_cpu_ms_per_s"], r["bare_ticker_wakeups_per_s"] = bare_ticker(a.seconds)
    with tempfile.TemporaryDirectory() as d, \
            rpg.Session(sandbox=os.path.join(d, "s")) as session:
        pilot = rpg.PilotManager(session).submit_pilots(
            rpg.PilotDescription(cores=2, runtime=a.seconds + 30))
        assert pilot.wait(state="ACTIVE", timeout=60) == "ACTIVE", pilot.reason
        time.sleep(2.0)  # start-up done: the loops settle
        procs = {"app_and_hub": psutil.Process(), "agent": psutil.Process(pilot.pid)}
        cpu = CPU({"agent": "rpg.agent"})
        c0, s0 = cpu.snap(), {k: switches(p) for k, p in procs.items()}
        t0 = time.perf_counter()
        time.sleep(a.seconds)
        dt = time.perf_counter() - t0
        used = CPU.since(c0, cpu.snap())
        s1 = {k: switches(p) for k, p in procs.items()}
        loop = session.hub.stats()["loop"]
    for k, name in (("app_and_hub", "this process"), ("agent", "agent")):
        r[f"{k}_cpu_ms_per_s"] = used[name] / dt * 1000
        r[f"{k}_wakeups_per_s"] = (s1[k] - s0[k]) / dt
        r[f"ratio_{k}_vs_bare_ticker"] = r[f"{k}_cpu_ms_per_s"] / max(
            r["bare_ticker_cpu_ms_per_s"], 0.1)
    r["hub_ticks"], r["hub_rests"] = loop["ticks"], loop.get("rests", 0)
    emit("idle", r, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
