"""``rpg report --plot FILE.png`` and ``--html FILE``: a profile drawn with matplotlib (Agg,
no display needed), as radical.analytics' plots are: units by state over time, pilot core
utilization, concurrency, and a histogram of rpg's overhead per unit; the HTML page carries
the summary table and that picture inline (one self-contained file).

matplotlib is imported here only, on first use: the agent and the hub never load it.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any

import numpy as np

from rpg import states
from rpg.report import Timeline, analyze, first_active_time, format_summary, unit_numbers

STEPS = 400  # points on the time axis


def _step_counts(starts: np.ndarray, ends: np.ndarray, grid: np.ndarray,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """How many intervals [start, end) hold each time of ``grid`` (weighted)."""
    if len(starts) == 0:
        return np.zeros(len(grid))
    w = np.ones(len(starts)) if weights is None else weights
    order_s, order_e = np.argsort(starts), np.argsort(ends)
    cum_s = np.concatenate([[0], np.cumsum(w[order_s])])
    cum_e = np.concatenate([[0], np.cumsum(w[order_e])])
    began = cum_s[np.searchsorted(starts[order_s], grid, side="right")]
    ended = cum_e[np.searchsorted(ends[order_e], grid, side="right")]
    return began - ended


def figure(tl: Timeline) -> Any:
    """The four plots of a profile, as a matplotlib Figure (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=100)
    axes = fig.subplots(2, 2)
    times = [t for u in tl.units.values() for t in u.values()]
    times += [t for p in tl.pilots.values() for t in p.values()]
    if not times:
        for ax in axes.flat:
            ax.text(0.5, 0.5, "no units in this profile", ha="center", va="center")
        return fig
    t0, t1 = min(times), max(times)
    grid = np.linspace(t0, max(t1, t0 + 1e-3), STEPS)
    x = grid - t0

    # 1. units by state over time: in each state, from entering it to entering the next
    ax = axes[0][0]
    order = [s for s in states.UNIT_PATH if s not in states.FINAL]
    layers, labels = [], []
    for st in order:
        s_, e_ = [], []
        for u in tl.units.values():
            if st not in u:
                continue
            later = [t for k, t in u.items() if t >= u[st] and k != st]
            s_.append(u[st])
            e_.append(min(later) if later else t1)
        layers.append(_step_counts(np.array(s_), np.array(e_), grid))
        labels.append(st)
    for st in (states.DONE, states.FAILED, states.CANCELED):
        ends = np.array([u[st] for u in tl.units.values() if st in u])
        layers.append(_step_counts(ends, np.full(len(ends), np.inf), grid))
        labels.append(st)
    ax.stackplot(x, *layers, labels=labels)
    ax.set_title("units by state")
    ax.set_xlabel("s since the first event")
    ax.set_ylabel("units")
    ax.legend(fontsize=7, loc="upper left")

    # 2. pilot core utilization: cores of executing units over the pilot's cores
    ax = axes[0][1]
    spans = {uid: unit_numbers(u, None) for uid, u in tl.units.items()}
    for pid, p in sorted(tl.pilots.items()):
        cores = tl.pilot_cores.get(pid)
        mine = [(spans[uid][0], tl.unit_cores.get(uid, 1)) for uid, pilot in
                tl.unit_pilot.items() if pilot == pid and spans.get(uid) is not None]
        if not cores or not mine:
            continue
        busy = _step_counts(np.array([s[0] for s, _ in mine]), np.array([s[1] for s, _ in mine]),
                            grid, np.array([c for _, c in mine], dtype=float))
        alive = (grid >= p.get(states.ACTIVE, np.inf)) & (grid <= max(p.values()))
        ax.plot(x, np.where(alive, 100.0 * busy / cores, np.nan), label=f"{pid} ({cores} cores)")
    ax.set_ylim(0, 105)
    ax.set_title("pilot core utilization")
    ax.set_xlabel("s since the first event")
    ax.set_ylabel("% of the pilot's cores executing units")
    if ax.lines:
        ax.legend(fontsize=7)

    # 3. concurrency: units executing
    ax = axes[1][0]
    ex = [v[0] for v in spans.values() if v is not None]
    ax.plot(x, _step_counts(np.array([s for s, _ in ex]), np.array([e for _, e in ex]), grid))
    ax.set_title("concurrency")
    ax.set_xlabel("s since the first event")
    ax.set_ylabel("units executing")

    # 4. rpg's overhead per unit
    ax = axes[1][1]
    start = first_active_time(tl)
    over = [n[3] * 1e3 for n in (unit_numbers(u, start) for u in tl.units.values())
            if n is not None]
    if over:
        ax.hist(np.clip(over, 0, np.percentile(over, 99.5)), bins=50)
    ax.set_title("rpg overhead per unit")
    ax.set_xlabel("ms (submit or pilot ACTIVE to final, less execution and core wait)")
    ax.set_ylabel("units")
    fig.tight_layout()
    return fig


def write_png(tl: Timeline, path: str) -> None:
    buf = io.BytesIO()
    figure(tl).savefig(buf, format="png")
    _write(path, buf.getvalue())


def write_html(tl: Timeline, path: str, title: str) -> None:
    """One file: the summary and the plots (PNG inline), nothing fetched."""
    buf = io.BytesIO()
    figure(tl).savefig(buf, format="png")
    img = base64.b64encode(buf.getvalue()).decode()
    summary = html.escape(format_summary(analyze(tl), title=title))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title></head><body style='font-family: sans-serif'>"
            f"<h1>{html.escape(title)}</h1><pre>{summary}</pre>"
            f"<img alt='units by state, utilization, concurrency, overhead' "
            f"src='data:image/png;base64,{img}'></body></html>\n")
    _write(path, page.encode())


def _write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
