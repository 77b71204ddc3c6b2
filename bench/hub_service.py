"""The hub as a service (``rpg hub serve``) against the embedded Session, in the same run.

    python bench/hub_service.py [--units 1000] [--clients 10] [--per-client 500] [--json]

1. N x /bin/true on a local pilot through a remote client, and through the embedded Session:
   units/s and their ratio (goal >= 0.8).
2. The event stream to one client: a client attaches to the finished session of 1. with
   10,000 units and replays its whole stream (events/s; goal >= 20,000).
3. 10,000 units submitted in one call through a remote client: seconds (goal < 1 s).
4. ``--clients`` clients at once (threads of this process, each its own Session and 2-core
   pilot), ``--per-client`` units each, submitted together once every pilot is ACTIVE, on a
   fresh service: its loop's lag p99 over the run (goal < 20 ms), units/s, and the CPU per
   unit of the service, the agents, their spawners, the units and the clients from that
   submit until all are DONE. On two cores the ten agents, their units and the clients share
   the CPU with the service's one loop.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rpg
from bench._common import CPU, emit


class Service:
    def __init__(self, sandbox: str) -> None:
        self.log = open(sandbox + ".log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "rpg.cli", "hub", "serve",
                                      "--sandbox", sandbox], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.access = os.path.join(sandbox, "access.json")
        deadline = time.monotonic() + 30
        while not os.path.exists(self.access):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("rpg hub serve did not start")
            time.sleep(0.05)
        time.sleep(0.2)

    def status(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "rpg.cli", "hub", "status", "--hub",
                              self.access, "--json"], capture_output=True, text=True,
                             check=True).stdout
        return json.loads(out)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.log.close()


SERVICE_NAMES = {"this process": "service", "agents": "agents", "agents's children": "spawners",
                 "agents's children (reaped)": "units"}
CLIENT_NAMES = {"this process": "clients"}


def run_units(session: rpg.Session, n: int, cores: int) -> tuple[float, str]:
    pilot = rpg.PilotManager(session).submit_pilots(rpg.PilotDescription(cores=cores,
                                                                         runtime=30))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    assert pilot.wait(state="ACTIVE", timeout=60) == "ACTIVE", pilot.reason
    t0 = time.perf_counter()
    units = umgr.submit_units([rpg.UnitDescription(executable="/bin/true") for _ in range(n)])
    umgr.wait_units(timeout=600)
    dt = time.perf_counter() - t0
    assert all(u.state == "DONE" for u in units), {u.state for u in units}
    return n / dt, session.uid


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=1000)
    ap.add_argument("--cores", type=int, default=8)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--per-client", type=int, default=500)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r: dict = {}
    with tempfile.TemporaryDirectory() as d:
        with rpg.Session(sandbox=os.path.join(d, "embedded")) as s:
            embedded, _ = run_units(s, a.units, a.cores)
        svc = Service(os.path.join(d, "hub"))
        try:
            with rpg.Session(hub=svc.access) as s:
                remote, _ = run_units(s, a.units, a.cores)
            with rpg.Session(sandbox=os.path.join(d, "embedded2")) as s:
                embedded = max(embedded, run_units(s, a.units, a.cores)[0])
            r.update(units=a.units, embedded_units_per_s=embedded,
                     remote_units_per_s=remote, ratio_remote_vs_embedded=remote / embedded)

            # 3. a big submit in one call; 2. the stream of that session, replayed
            s = rpg.Session(hub=svc.access)
            pilot = rpg.PilotManager(s).submit_pilots(rpg.PilotDescription(cores=a.cores))
            umgr = rpg.UnitManager(s)
            umgr.add_pilots(pilot)
            t0 = time.perf_counter()
            units = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")
                                       for _ in range(10_000)])
            r["submit_10000_in_one_call_s"] = time.perf_counter() - t0
            umgr.wait_units(timeout=600)
            uid = s.detach()
            assert all(u.state == "DONE" for u in units)
            t0 = time.perf_counter()
            with rpg.Session(hub=svc.access, attach=uid) as again:
                dt = time.perf_counter() - t0
                events = again._seen
            r["stream_events_replayed"] = events
            r["stream_events_per_s"] = events / dt

        finally:
            svc.stop()
        # 4. many clients at once, on a service of their own (its loop's lag is theirs only)
        svc = Service(os.path.join(d, "hub4"))
        try:
            n = a.clients
            active = threading.Barrier(n + 1, timeout=300)  # every pilot ACTIVE: all submit
            finished = threading.Barrier(n + 1, timeout=600)  # all DONE, pilots still up
            rates: list[float] = []

            def client() -> None:
                try:
                    with rpg.Session(hub=svc.access) as cs:
                        pilot = rpg.PilotManager(cs).submit_pilots(
                            rpg.PilotDescription(cores=2, runtime=120))
                        umgr = rpg.UnitManager(cs)
                        umgr.add_pilots(pilot)
                        assert pilot.wait(state="ACTIVE", timeout=60) == "ACTIVE", pilot.reason
                        active.wait()
                        t0 = time.perf_counter()
                        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")
                                                   for _ in range(a.per_client)])
                        umgr.wait_units(timeout=600)
                        rates.append(a.per_client / (time.perf_counter() - t0))
                        assert all(u.state == "DONE" for u in units)
                        finished.wait()  # the CPU is read while every pilot still runs
                except BaseException:
                    active.abort()  # nobody waits for a client that failed
                    finished.abort()
                    raise

            before = svc.status()
            ts = [threading.Thread(target=client) for _ in range(n)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            try:
                active.wait()
                # the service (as "this process"), its agents, their spawners and the units
                # those reaped; and the clients, this process
                service, clients = CPU({"agents": "rpg.agent"}, root=svc.proc.pid), CPU({})
                cpu0, t1 = (service.snap(), clients.snap()), time.perf_counter()
                finished.wait()
                cpu1, run_s = (service.snap(), clients.snap()), time.perf_counter() - t1
            finally:
                for t in ts:
                    t.join()
            wall = time.perf_counter() - t0
            after = svc.status()
            old = {x["uid"] for x in before["sessions"]}
            lags = [x["loop"]["lag_p99_ms"] for x in after["sessions"]
                    if x["uid"] not in old and x["loop"]]
            total = n * a.per_client
            r.update(clients=n, units_per_client=a.per_client,
                     clients_done=len(rates), clients_wall_s=wall,
                     clients_units_per_s=total / wall,
                     clients_run_s=run_s, clients_run_units_per_s=total / run_s,
                     **{f"cpu_us_per_unit_{name}": round(used.get(key, 0.0) / total * 1e6)
                        for used, names in ((CPU.since(cpu0[0], cpu1[0]), SERVICE_NAMES),
                                            (CPU.since(cpu0[1], cpu1[1]), CLIENT_NAMES))
                        for key, name in names.items()},
                     session_hub_lag_p99_ms_max=max(lags),
                     front_loop_lag_p99_ms=after["loop"]["lag_p99_ms"],
                     front_loop_blocked=after["loop"]["blocked_events"])
        finally:
            svc.stop()
    emit("hub_service", r, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
