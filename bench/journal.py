"""What the hub service's journal costs, and how long a restart takes (issue 17).

    python bench/journal.py [--units 1000] [--rounds 2] [--restore-units 100000] [--json]

1. N x /bin/true on a local pilot through ``rpg hub serve``, with its journal and with
   ``--no-journal``, alternating runs on fresh services in the same run: units/s of each and
   their ratio (median of the rounds; goal >= 0.9).
2. Restart time: a journal of ``--restore-units`` units (each with its seven events, all DONE,
   on a pilot that ended) written with the journal's own framing, then ``rpg hub serve``
   started on it: seconds until it listens with the session restored, against the same start
   on an empty sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rpg
from bench._common import emit
from bench.hub_service import run_units
from rpg.hub.journal import JOURNAL, _pack


def serve(sandbox: str, *extra: str) -> tuple[subprocess.Popen, str, float]:
    """Start a service; returns it, its access file, and seconds until it listened."""
    log = sandbox + ".log"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rpg.cli", "hub", "serve", "--sandbox",
                             sandbox, *extra], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while True:
        with open(log, "rb") as fh:
            if b"listening on" in fh.read():
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"rpg hub serve did not start: {open(log).read()}")
        time.sleep(0.01)
    return proc, os.path.join(sandbox, "access.json"), time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(300)


def rate(d: str, name: str, n: int, *extra: str) -> float:
    proc, access, _ = serve(os.path.join(d, name), *extra)
    try:
        with rpg.Session(hub=access) as s:
            return run_units(s, n, 8)[0]
    finally:
        stop(proc)


def synthetic_journal(sandbox: str, n: int) -> str:
    """A session of ``n`` DONE units as the hub would have journaled it."""
    uid = "rpg.session.bench.restore"
    sdir = os.path.join(sandbox, "sessions", uid)
    os.makedirs(sdir, mode=0o700)
    ts = time.time()
    pilot = "pilot.000001"
    desc = rpg.UnitDescription(executable="/bin/true").as_dict()
    pdesc = rpg.PilotDescription(cores=8).as_dict()
    with open(os.path.join(sdir, JOURNAL), "wb") as fh:
        fh.write(_pack(["session", {"uid": uid, "owner": os.environ.get("USER", "root"),
                                    "address": "tcp://127.0.0.1:0", "created": ts}]))
        fh.write(_pack(["mgr", "pmgr.000000", "pilot"]))
        fh.write(_pack(["mgr", "umgr.000002", "unit"]))
        fh.write(_pack(["pilots", "pmgr.000000", ts, [[pilot, pdesc, "t" * 43]]]))
        fh.write(_pack(["add", "umgr.000002", [pilot]]))
        for st in ("LAUNCHING", "PENDING", "ACTIVE"):
            fh.write(_pack(["ev", "pilot", pilot, st, ts, {}]))
        for start in range(0, n, 10000):
            uids = [f"unit.{i + 3:06d}" for i in range(start, min(n, start + 10000))]
            out = [_pack(["units", "umgr.000002", ts, [[u, desc] for u in uids]])]
            for u in uids:
                out += [_pack(["ev", "unit", u, "BOUND", ts, {"pilot": pilot}]),
                        _pack(["ev", "unit", u, "STAGING_IN", ts,
                               {"sandbox": f"{sdir}/{pilot}/{u}"}]),
                        _pack(["ev", "unit", u, "SCHEDULING", ts, {}]),
                        _pack(["ev", "unit", u, "EXECUTING", ts, {}]),
                        _pack(["ev", "unit", u, "STAGING_OUT", ts, {}]),
                        _pack(["ev", "unit", u, "DONE", ts,
                               {"exit_code": 0, "stdout": "", "stderr": ""}])]
            fh.write(b"".join(out))
        fh.write(_pack(["ev", "pilot", pilot, "DONE", ts, {"reason": "bench"}]))
    return os.path.join(sdir, JOURNAL)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--restore-units", type=int, default=100000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r: dict = {}
    with tempfile.TemporaryDirectory() as d:
        with_j, without = [], []
        for i in range(a.rounds):  # alternating: the machine's noise hits both alike
            without.append(rate(d, f"plain{i}", a.units, "--no-journal"))
            with_j.append(rate(d, f"journaled{i}", a.units))
        r["units"] = a.units
        r["units_per_s_no_journal"] = statistics.median(without)
        r["units_per_s_journal"] = statistics.median(with_j)
        r["journal_ratio (goal >= 0.9)"] = r["units_per_s_journal"] / r["units_per_s_no_journal"]
        r["rounds"] = f"without {[round(x) for x in without]}, with {[round(x) for x in with_j]}"

        empty = os.path.join(d, "empty")
        proc, _, base = serve(empty)
        stop(proc)
        full = os.path.join(d, "full")
        os.makedirs(full, mode=0o700)
        path = synthetic_journal(full, a.restore_units)
        r["journal_MB"] = os.path.getsize(path) / 1e6
        proc, access, took = serve(full)
        try:
            st = json.loads(subprocess.run(
                [sys.executable, "-m", "rpg.cli", "hub", "status", "--hub", access, "--json"],
                capture_output=True, text=True, check=True).stdout)
            back = sum(sum(x["units"].values()) for x in st["sessions"])
            assert back == a.restore_units, f"{back} units restored of {a.restore_units}"
        finally:
            stop(proc)
        r["restart_s_empty_sandbox"] = base
        r[f"restart_s_{a.restore_units}_units"] = took
        r["restart_ratio_to_empty"] = took / base
    emit("journal", r, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
