"""Analytics over a session's profile events: counts, throughput, overheads, concurrency.

``analyze`` takes profile records (dicts with time, uid, state, component) as written by the hub
and returns plain numbers; ``format_summary`` renders them as the table ``rpg run`` and
``rpg report`` print. A record that is not a usable profile record (``rpg.log.record_problem``)
is skipped and counted in ``skipped_records``, never a traceback.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from rpg import states
from rpg.log import record_problem

TRANSFER = "TRANSFER"  # a client:// file moved by the hub (not a state)


class Timeline:
    """Per unit and per pilot, the time of each state (the last, if one came twice), what
    rpg report plots needs besides (a unit's pilot and cores, a pilot's cores), and the
    TRANSFER records (direction, bytes, seconds)."""

    def __init__(self, events: Iterable[Any]) -> None:
        self.units: dict[str, dict[str, float]] = {}
        self.pilots: dict[str, dict[str, float]] = {}
        self.unit_pilot: dict[str, str] = {}
        self.unit_cores: dict[str, int] = {}
        self.pilot_cores: dict[str, int] = {}
        self.transfers: list[dict[str, Any]] = []
        self.skipped = 0
        for ev in events:
            if record_problem(ev) is not None:
                self.skipped += 1
                continue
            uid, st, t = ev["uid"], ev["state"], float(ev["time"])
            if st == TRANSFER:
                self.transfers.append(ev)
            elif uid.startswith("unit."):
                self.units.setdefault(uid, {})[st] = t
                if st == states.BOUND and isinstance(ev.get("pilot"), str):
                    self.unit_pilot[uid] = ev["pilot"]
                    if isinstance(ev.get("cores"), int):
                        self.unit_cores[uid] = ev["cores"]
            elif uid.startswith("pilot."):
                self.pilots.setdefault(uid, {})[st] = t
                if st == states.NEW and isinstance(ev.get("cores"), int):
                    self.pilot_cores[uid] = ev["cores"]


def analyze(events: Iterable[Any]) -> dict[str, Any]:
    tl = events if isinstance(events, Timeline) else Timeline(events)
    units, pilots, skipped = tl.units, tl.pilots, tl.skipped
    t_active = first_active_time(tl)
    counts = {s: 0 for s in (states.DONE, states.FAILED, states.CANCELED)}
    counts["unfinished"] = 0
    execs, overheads, waits, spans = [], [], [], []
    first_new, last_final = None, None
    for times in units.values():
        final = next((s for s in states.FINAL if s in times), None)
        if final is None:
            counts["unfinished"] += 1
            continue
        counts[final] += 1
        t_new = times.get(states.NEW, times[final])
        first_new = t_new if first_new is None else min(first_new, t_new)
        last_final = times[final] if last_final is None else max(last_final, times[final])
        nums = unit_numbers(times, t_active)
        if nums is not None:
            span, ex, wait, over = nums
            spans.append(span)
            execs.append(ex)
            waits.append(wait)
            overheads.append(over)
    out: dict[str, Any] = {"units": len(units), "counts": counts, "skipped_records": skipped}
    if first_new is not None and last_final is not None and last_final > first_new:
        out["makespan_s"] = last_final - first_new
        out["throughput_per_s"] = (len(units) - counts["unfinished"]) / (last_final - first_new)
    if overheads:
        ov = np.array(overheads)
        out["overhead_ms"] = {"mean": float(ov.mean() * 1e3),
                              "p50": float(np.percentile(ov, 50) * 1e3),
                              "p95": float(np.percentile(ov, 95) * 1e3)}
        out["exec_s_mean"] = float(np.mean(execs))
        out["core_wait_s_mean"] = float(np.mean(waits))
    if spans:
        out["peak_concurrency"] = _peak(spans)
    if tl.transfers:
        t_in = [e for e in tl.transfers if e.get("direction") == "in"]
        t_out = [e for e in tl.transfers if e.get("direction") == "out"]
        out["transfers"] = {
            "in": len(t_in), "out": len(t_out),
            "bytes_in": sum(int(e.get("bytes") or 0) for e in t_in),
            "bytes_out": sum(int(e.get("bytes") or 0) for e in t_out)}
    startup = [p[states.ACTIVE] - p[states.NEW] for p in pilots.values()
               if states.ACTIVE in p and states.NEW in p]
    if startup:
        out["pilot_startup_s"] = float(np.mean(startup))
    return out


def first_active_time(tl: Timeline) -> float | None:
    """When the first pilot became ACTIVE (None: none did)."""
    active = [p[states.ACTIVE] for p in tl.pilots.values() if states.ACTIVE in p]
    return min(active) if active else None


def unit_numbers(times: dict[str, float], first_active: float | None
                 ) -> tuple[tuple[float, float], float, float, float] | None:
    """A finished unit's (execution span, execution s, waiting for cores s, rpg overhead s),
    or None if it never executed."""
    final = next((s for s in states.FINAL if s in times), None)
    if final is None or states.EXECUTING not in times:
        return None
    t_new = times.get(states.NEW, times[final])
    end = times.get(states.STAGING_OUT, times[final])
    ex = end - times[states.EXECUTING]
    wait = times[states.EXECUTING] - times.get(states.SCHEDULING, times[states.EXECUTING])
    # Time before any pilot was ACTIVE is the pilot's start-up, not per-unit overhead.
    start = max(t_new, first_active) if first_active is not None else t_new
    return (times[states.EXECUTING], end), ex, wait, (times[final] - start) - ex - wait


def _peak(spans: list[tuple[float, float]]) -> int:
    starts = np.sort(np.array([s for s, _ in spans]))
    ends = np.sort(np.array([e for _, e in spans]))
    # running at each start = starts so far - ends strictly before it
    running = np.arange(1, len(starts) + 1) - np.searchsorted(ends, starts, side="right")
    return int(running.max()) if len(running) else 0


def format_summary(a: dict[str, Any], title: str = "rpg summary") -> str:
    rows = [(title, "")]
    for k, v in a["counts"].items():
        if v or k != "unfinished":
            rows.append((f"units {k}", str(v)))
    if "makespan_s" in a:
        rows.append(("makespan", f"{a['makespan_s']:.2f} s"))
        rows.append(("throughput", f"{a['throughput_per_s']:.1f} units/s"))
    if "pilot_startup_s" in a:
        rows.append(("pilot NEW -> ACTIVE", f"{a['pilot_startup_s']:.2f} s"))
    if "overhead_ms" in a:
        o = a["overhead_ms"]
        rows.append(("rpg overhead per unit*", f"mean {o['mean']:.1f} ms, p50 {o['p50']:.1f} ms, "
                                              f"p95 {o['p95']:.1f} ms"))
        rows.append(("execution per unit", f"mean {a['exec_s_mean'] * 1e3:.1f} ms"))
        rows.append(("waiting for cores", f"mean {a['core_wait_s_mean'] * 1e3:.1f} ms"))
    if "peak_concurrency" in a:
        rows.append(("peak concurrent units", str(a["peak_concurrency"])))
    if "transfers" in a:
        tr = a["transfers"]
        rows.append(("client:// transfers", f"{tr['in']} in ({tr['bytes_in'] / 1e6:.2f} MB), "
                                           f"{tr['out']} out ({tr['bytes_out'] / 1e6:.2f} MB)"))
    if a.get("skipped_records"):
        rows.append(("records skipped", f"{a['skipped_records']} (not usable profile records)"))
    width = max(len(r[0]) for r in rows[1:]) if len(rows) > 1 else 10
    lines = [rows[0][0], "-" * (width + 40)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows[1:]]
    if "overhead_ms" in a:
        lines.append("* from submit (or pilot ACTIVE, if later) to the final state, less execution")
        lines.append("  and waiting for cores: binding, staging, spawn, output, state round trips")
    return "\n".join(lines)
