"""Helpers shared by the benchmarks: baselines measured in the same run, and output."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any


def raw_spawn_rate(n: int = 600, threads: int = 4) -> float:
    """/bin/true spawned with subprocess.run from ``threads`` threads: processes per second."""
    per = n // threads

    def work() -> None:
        for _ in range(per):
            subprocess.run(["/bin/true"], check=True)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return per * threads / (time.perf_counter() - t0)


def emit(name: str, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"bench": name, **result}))
        return
    print(f"== {name}")
    for k, v in result.items():
        print(f"  {k:<34} {v:.3f}" if isinstance(v, float) else f"  {k:<34} {v}")
