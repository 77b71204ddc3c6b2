"""io_pool benchmark: lane round trips against direct calls, and the slow-disk harness's fast-read
p99 with and without one disk (lane) stalled. Every ratio's baseline is measured in this run.

    python bench/io_pool_bench.py            # about a minute on 2 cores
    python bench/io_pool_bench.py --quick    # fewer ops and rounds, no blocking-mode contrast
    python bench/io_pool_bench.py --json     # one JSON object

Targets (2-core machine): a lane sustains >= 5,000 small ops/s from many greenlets, at >= 0.9x
gevent's ThreadPool from 64 greenlets and from one on one CPU (issue 16; below); in offload
mode the fast-read p99 with one disk stalled is <= 1.2x the unstalled p99, with 0 timeouts.
Exit status 1 if a target is missed.

One greenlet at a time, a round trip is the thread wake-ups on both sides, and on this VM
what they cost depends on where the kernel puts the threads: in one process, round after round,
a lane swung between 13,000 and 100,000 ops/s and a ThreadPool between 12,000 and 58,000
(2026-12-07). Here, as placed, the lane's thread ran on the other vCPU and slept between calls
(1.4 context switches a call on each side, 16,000 ops/s), while the ThreadPool's worker switched
2.9 times a call on each side at 49,000 ops/s. So the one-greenlet rounds run twice: as the
machine places them (printed, not checked), and with the process on one CPU (checked), where
no wake-up crosses CPUs and the round trip is the two pools' own code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import perf_counter
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gevent
import numpy as np
from gevent.threadpool import ThreadPool

from rpg.io_pool import IOPool
from tools.simulated_disk_io import stress
from tools.simulated_disk_io.client import run_clients

LANE_OPS_TARGET = 5000.0
P99_RATIO_TARGET = 1.2


def _noop() -> int:
    return 1


@contextmanager
def _one_cpu() -> Iterator[None]:
    """Every thread of this process (and those it starts meanwhile) on one CPU, then back."""
    before = os.sched_getaffinity(0)
    cpu = {min(before)}

    def pin(cpus: set[int]) -> None:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:  # a thread that has just ended
                pass

    pin(cpu)
    try:
        yield
    finally:
        pin(before)


def _rate(n: int, fn: Callable[[], Any], greenlets: int) -> float:
    """ops/s of ``fn`` called ``n`` times in total from ``greenlets`` greenlets."""
    per = n // greenlets

    def worker() -> None:
        for _ in range(per):
            fn()

    t0 = perf_counter()
    gevent.joinall([gevent.spawn(worker) for _ in range(greenlets)], raise_error=True)
    return per * greenlets / (perf_counter() - t0)


ROUNDS = 5


def bench_lane(ops: int, greenlets: int, threads: int, one_cpu: bool = False) -> dict[str, Any]:
    """Small ops through a lane, through a bare gevent ThreadPool, and as direct calls; with
    ``one_cpu``, the process on one CPU meanwhile (no wake-up crosses CPUs)."""
    if one_cpu:
        with _one_cpu():
            return bench_lane(ops, greenlets, threads)
    t0 = perf_counter()
    for _ in range(ops):
        _noop()
    direct = ops / (perf_counter() - t0)

    # Alternating rounds, each side's median: one round each swings 0.85-1.03 on this VM.
    raw = ThreadPool(threads)
    pool = IOPool(disk_threads=threads)
    raw_rates, lane_rates = [], []
    try:
        lane = pool.lane("bench", threads=threads)
        _rate(min(ops, 2000), lambda: raw.spawn(_noop).get(), greenlets)  # warm up
        _rate(min(ops, 2000), lambda: lane.run(_noop), greenlets)
        for i in range(ROUNDS):  # each side first in every other round (ABBA...)
            for side in ((0, 1) if i % 2 == 0 else (1, 0)):
                if side == 0:
                    raw_rates.append(_rate(ops, lambda: raw.spawn(_noop).get(), greenlets))
                else:
                    lane_rates.append(_rate(ops, lambda: lane.run(_noop), greenlets))
        health = lane.health()
    finally:
        raw.kill()
        stuck = pool.close(wait=2.0)
    raw_rate, lane_rate = statistics.median(raw_rates), statistics.median(lane_rates)
    return {
        "ops": ops,
        "greenlets": greenlets,
        "threads": threads,
        "direct_ops_s": round(direct),
        "threadpool_ops_s": round(raw_rate),
        "lane_ops_s": round(lane_rate),
        "lane_vs_direct": round(lane_rate / direct, 6),
        "lane_vs_threadpool": round(lane_rate / raw_rate, 3),
        "lane_p50_ms": health["p50_ms"],
        "lane_p99_ms": health["p99_ms"],
        "lane_errors": health["errors"],
        "threads_stuck": stuck,
    }


def _wait_lane_idle(server: stress.ServerProcess, lane: str, limit: float) -> None:
    """Wait until the server's lane has no read running (the last staller read has ended)."""
    deadline = perf_counter() + limit
    while perf_counter() < deadline:
        stats = server.stats(timeout=5.0) or {}
        if stats.get("lanes", {}).get(lane, {}).get("running", 0) == 0:
            return
        gevent.sleep(0.1)


def bench_stalled_lane(rounds: int, clients: int, requests: int, fast_ms: int, stall_ms: int,
                       disks: int, timeout: float) -> dict[str, Any]:
    """Offload mode, one server: fast reads alone vs fast reads while a staller keeps disk sdb's
    lane stalled. The two conditions alternate, ``rounds`` times each, and pool their samples."""
    lat: dict[str, list[float]] = {"unstalled": [], "stalled": []}
    per_round: dict[str, list[float]] = {"unstalled": [], "stalled": []}
    timeouts = {"unstalled": 0, "stalled": 0}
    errors = {"unstalled": 0, "stalled": 0}
    stalls_done = 0
    with stress.server_running("offload", threads_per_disk=max(8, clients + 1)) as server:
        run_clients(port=server.port, clients=clients, requests=10, fast_ms=fast_ms,
                    stall_every=0, disks=disks, timeout=timeout)  # warm up the lanes
        for r in range(rounds):
            order = ("unstalled", "stalled") if r % 2 == 0 else ("stalled", "unstalled")
            for cond in order:
                if cond == "unstalled":
                    _wait_lane_idle(server, "disk:sdb", stall_ms / 1000.0 + 5.0)
                res = run_clients(port=server.port, clients=clients, requests=requests,
                                  fast_ms=fast_ms, stall_ms=stall_ms, stall_every=0,
                                  disks=disks, timeout=timeout,
                                  stallers=1 if cond == "stalled" else 0)
                fast = [o.latency_ms for o in res.outcomes
                        if not o.planned.stalled and o.error is None]
                lat[cond] += fast
                per_round[cond].append(round(float(np.percentile(fast, 99)), 2))
                s = res.summary()
                timeouts[cond] += s["timeouts"]
                errors[cond] += s["errors"]
                if cond == "stalled":
                    stalls_done += s["stalled_requests"]
        stats = server.stats() or {}

    def p(cond: str, q: float) -> float:
        return round(float(np.percentile(lat[cond], q)), 3)

    return {
        "rounds": rounds,
        "fast_requests_per_condition": len(lat["unstalled"]),
        "unstalled_p50_ms": p("unstalled", 50),
        "unstalled_p99_ms": p("unstalled", 99),
        "stalled_p50_ms": p("stalled", 50),
        "stalled_p99_ms": p("stalled", 99),
        "p99_ratio": round(p("stalled", 99) / p("unstalled", 99), 3),
        "p99_per_round": per_round,
        "timeouts": timeouts,
        "errors": errors,
        "stalled_reads_completed": stalls_done,
        "loop_blocked_events": stats.get("loop_blocked_events"),
        "loop_lag_max_ms": stats.get("loop_lag_max_ms"),
    }


KEEP = ("mode", "clients", "requests", "timeouts", "client_timeouts", "queue_timeouts",
        "errors", "fast_p50_ms", "fast_p99_ms", "fast_max_ms", "loop_blocked_events",
        "loop_lag_max_ms", "server_cpu_s", "server_peak_rss_mb", "client_wall_s")


def bench_harness_mix(mode: str, clients: int, requests: int) -> dict[str, Any]:
    """The stress harness's default mix (every 20th read of a client stalls 4 s on sdb)."""
    r = stress.run(mode=mode, clients=clients, requests=requests)
    return {k: r[k] for k in KEEP}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a shorter run (no blocking contrast)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    quick = args.quick
    t0 = perf_counter()
    out: dict[str, Any] = {"bench": "io_pool"}
    out["lane"] = bench_lane(ops=5000 if quick else 20000, greenlets=64, threads=4)
    out["lane_serial"] = bench_lane(ops=2000 if quick else 5000, greenlets=1, threads=4)
    out["lane_serial_one_cpu"] = bench_lane(ops=2000 if quick else 5000, greenlets=1,
                                            threads=4, one_cpu=True)
    out["stalled_lane"] = bench_stalled_lane(
        rounds=2 if quick else 3, clients=5, requests=60 if quick else 150, fast_ms=10,
        stall_ms=4000, disks=4, timeout=5.0)
    out["mix_offload"] = bench_harness_mix("offload", clients=5, requests=20)
    if not quick:
        out["mix_blocking"] = bench_harness_mix("blocking", clients=5, requests=20)
    lane, st = out["lane"], out["stalled_lane"]
    checks = {
        "lane_ops_s >= 5000": lane["lane_ops_s"] >= LANE_OPS_TARGET,
        "lane/ThreadPool >= 0.9 (64 greenlets; 1, on one CPU)": min(
            lane["lane_vs_threadpool"], out["lane_serial_one_cpu"]["lane_vs_threadpool"]) >= 0.9,
        "stalled/unstalled fast p99 <= 1.2": st["p99_ratio"] <= P99_RATIO_TARGET,
        "offload timeouts == 0": (st["timeouts"]["stalled"] + st["timeouts"]["unstalled"]
                                  + out["mix_offload"]["timeouts"]) == 0,
        "offload loop blocked == 0": not st["loop_blocked_events"]
        and not out["mix_offload"]["loop_blocked_events"],
    }
    if "mix_blocking" in out:
        checks["blocking mode shows timeouts"] = out["mix_blocking"]["timeouts"] > 0
    out["checks"] = checks
    out["wall_s"] = round(perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"lane round trips ({lane['greenlets']} greenlets, {lane['threads']} threads, "
              f"{lane['ops']} no-op calls)")
        print(f"  direct call      {lane['direct_ops_s']:>12,} ops/s")
        print(f"  gevent ThreadPool{lane['threadpool_ops_s']:>12,} ops/s")
        print(f"  io_pool lane     {lane['lane_ops_s']:>12,} ops/s   lane/direct "
              f"{lane['lane_vs_direct']:.5f}   lane/ThreadPool {lane['lane_vs_threadpool']:.2f}")
        for key, where in (("lane_serial", "as placed"), ("lane_serial_one_cpu", "one CPU")):
            ser = out[key]
            print(f"  one greenlet at a time ({where}): ThreadPool {ser['threadpool_ops_s']:,} "
                  f"ops/s, lane {ser['lane_ops_s']:,} ops/s, lane/ThreadPool "
                  f"{ser['lane_vs_threadpool']:.2f}")
        print(f"offload server, fast reads (10 ms) with and without disk sdb stalled "
              f"(4 s reads back to back), {st['rounds']} alternating rounds, "
              f"{st['fast_requests_per_condition']} fast reads each")
        print(f"  unstalled  p50 {st['unstalled_p50_ms']:.2f} ms  p99 "
              f"{st['unstalled_p99_ms']:.2f} ms   per round {st['p99_per_round']['unstalled']}")
        print(f"  stalled    p50 {st['stalled_p50_ms']:.2f} ms  p99 "
              f"{st['stalled_p99_ms']:.2f} ms   per round {st['p99_per_round']['stalled']}")
        print(f"  p99 ratio stalled/unstalled {st['p99_ratio']:.3f}   timeouts "
              f"{st['timeouts']}   loop blocked events {st['loop_blocked_events']}")
        for key in ("mix_offload", "mix_blocking"):
            if key in out:
                m = out[key]
                print(f"harness mix, {m['mode']:8}: timeouts {m['timeouts']} (client "
                      f"{m['client_timeouts']}, queue {m['queue_timeouts']}), fast p50 "
                      f"{m['fast_p50_ms']:.1f} ms p99 {m['fast_p99_ms']:.1f} ms, loop blocked "
                      f"{m['loop_blocked_events']}, server CPU {m['server_cpu_s']:.2f} s, "
                      f"RSS {m['server_peak_rss_mb']:.1f} MB")
        if "mix_blocking" in out:
            print(f"  blocking/offload fast p99: "
                  f"{out['mix_blocking']['fast_p99_ms'] / out['mix_offload']['fast_p99_ms']:.0f}x")
        for name, ok in checks.items():
            print(f"{'PASS' if ok else 'FAIL'}  {name}")
        print(f"({out['wall_s']} s)")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
