"""State updates agent -> hub: batched pushes against one zerorpc call per update.

    python bench/rpc.py [--units 2000] [--batch 500] [--json]

A real hub (Session) receives the updates through its zerorpc service on 127.0.0.1, validates
and applies each one (profile, callbacks) exactly as from an agent. The pilot is registered by
hand (no agent process), so only the RPC path is measured. Baseline in the same run: the raw
zerorpc call rate to a no-op method.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gevent
import zerorpc

import rpg
from bench._common import emit
from rpg import states
from rpg.internals import bound_address

AGENT_STATES = [states.STAGING_IN, states.SCHEDULING, states.EXECUTING, states.STAGING_OUT,
                states.DONE]


def setup(hub, n: int, tag: str) -> tuple[str, str, list[str]]:
    """A registered pilot with n units in flight (runs on the hub loop)."""
    token = secrets.token_urlsafe(32)
    pid = f"pilot.bench{tag}"
    p = hub.ledger.new_pilot(pid, "pmgr.bench", rpg.PilotDescription(cores=n).as_dict(), token,
                             hub.sandbox)
    for s in (states.LAUNCHING, states.PENDING, states.ACTIVE):
        hub.ledger.move("pilot", p, s, "bench")
    p.last_seen = time.time()
    desc = rpg.UnitDescription(executable="/bin/true").as_dict()
    for i in range(n):
        if i % 200 == 0:
            gevent.sleep(0)  # setup runs on the hub loop: let it breathe
        uid = f"unit.bench{tag}.{i:06d}"
        u = hub.ledger.new_unit(uid, "umgr.bench", desc, time.time())
        hub.ledger.move("unit", u, states.BOUND, "bench")
        u.pilot, u.at_agent = pid, True
        p.in_flight.add(uid)
    return pid, token, [f"unit.bench{tag}.{i:06d}" for i in range(n)]


def pushes(address: str, pid: str, token: str, uids: list[str], batch: int) -> float:
    client = zerorpc.Client(timeout=60, heartbeat=5)
    client.connect(address)
    try:
        updates = [[u, s, time.time(), {}] for s in AGENT_STATES for u in uids]
        t0 = time.perf_counter()
        for i in range(0, len(updates), batch):
            r = client.push(pid, token, updates[i:i + batch])
            assert not r["errors"], r["errors"][:3]
        return len(updates) / (time.perf_counter() - t0)
    finally:
        client.close()


def raw_call_rate(n: int = 2000) -> float:
    class Noop:
        def noop(self):
            return None

    server = zerorpc.Server(Noop(), heartbeat=5)
    server.bind("tcp://127.0.0.1:*")

    addr = bound_address(server)
    g = gevent.spawn(server.run)
    client = zerorpc.Client(timeout=30, heartbeat=5)
    client.connect(addr)
    try:
        client.noop()
        t0 = time.perf_counter()
        for _ in range(n):
            client.noop()
        return n / (time.perf_counter() - t0)
    finally:
        client.close()
        g.kill()
        server.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    raw = raw_call_rate()
    with tempfile.TemporaryDirectory() as d, rpg.Session(sandbox=os.path.join(d, "s")) as s:
        pid1, tok1, uids1 = s.hub.call(setup, s.hub, a.units // 4, "single")
        single = pushes(s.hub.address, pid1, tok1, uids1, 1)
        pid2, tok2, uids2 = s.hub.call(setup, s.hub, a.units, "batch")
        batched = pushes(s.hub.address, pid2, tok2, uids2, a.batch)
        lag = s.hub.stats()["loop"]
    r = {"raw_zerorpc_calls_per_s": raw,
         "updates_per_s_one_call_each": single,
         f"updates_per_s_batches_of_{a.batch}": batched,
         "ratio_batched_vs_one_call_each": batched / single,
         "ratio_one_call_each_vs_raw_calls": single / raw,
         "hub_loop_lag_p99_ms": lag["lag_p99_ms"],
         "hub_loop_blocked_events": lag["blocked_events"]}
    emit("rpc", r, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
