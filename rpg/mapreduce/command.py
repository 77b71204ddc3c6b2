"""``rpg hist FILE [FILE2]``: one MapReduce job on a local pilot, its answers as they come (a
progress line on stderr), then the result as text (a 16-row histogram) or ``--json``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from rpg.progress import ProgressBar

KINDS = ("hist", "entropy", "diff")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rpg", "mapreduce")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("hist", help="a byte histogram, entropy or diff of large files, "
                                    "progressive and cached (rpg.MapReduce)")
    p.add_argument("files", nargs="+", metavar="FILE", help="the file (two for --kind diff)")
    p.add_argument("--kind", choices=KINDS, default="hist", help="what to compute (hist)")
    p.add_argument("--start", type=int, default=0, help="first byte (0)")
    p.add_argument("--end", type=int, default=None, help="end byte, exclusive (file size)")
    p.add_argument("--cores", type=int, default=2, help="local pilot cores (2)")
    p.add_argument("--cache-dir", default=None,
                   help=f"chunk cache directory ({default_cache_dir()})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def render(kind: str, value: Any, rows: int = 16, width: int = 40) -> str:
    """The result as text: for a histogram, ``rows`` lines of 256/rows byte values each."""
    if kind != "hist":
        return f"{kind}: {value:.6f} bits per byte" if kind == "entropy" else \
            f"{kind}: {value} differing bytes"
    h = np.asarray(value, dtype=np.int64)
    total = int(h.sum())
    per = len(h) // rows
    sums = h.reshape(rows, per).sum(axis=1)
    top = max(1, int(sums.max()))
    lines = [f"byte histogram of {total} bytes ({per} values a row)"]
    for i, n in enumerate(sums):
        bar = "#" * round(width * int(n) / top)
        lines.append(f"  0x{i * per:02x}-0x{i * per + per - 1:02x} {int(n):>14} {bar}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import rpg

    want = 2 if args.kind == "diff" else 1
    if len(args.files) != want:
        print(f"rpg hist: --kind {args.kind} takes {want} file(s), got {len(args.files)}",
              file=sys.stderr)
        return 2
    if args.cores < 1:
        print(f"rpg hist: --cores must be >= 1, got {args.cores}", file=sys.stderr)
        return 2
    if args.start < 0 or (args.end is not None and args.end <= args.start):
        print(f"rpg hist: need 0 <= --start < --end, got --start {args.start} --end "
              f"{args.end}", file=sys.stderr)
        return 2
    paths = [os.path.abspath(f) for f in args.files]
    for f in paths:
        if not os.path.isfile(f):
            print(f"rpg hist: {f}: not a regular file", file=sys.stderr)
            return 2
    sandbox = tempfile.mkdtemp(prefix="rpg-hist-")
    t0 = time.monotonic()
    first = None
    n = 0
    try:
        with rpg.Session(sandbox=os.path.join(sandbox, "session")) as session:
            pilot = rpg.PilotManager(session).submit_pilots(
                rpg.PilotDescription(cores=args.cores, runtime=24 * 60))
            mr = rpg.MapReduce(session, [pilot], args.cache_dir or default_cache_dir())
            try:
                job = mr.submit(args.kind, paths, args.start, args.end)
                last = None
                bar = ProgressBar(100, "rpg hist: % covered")
                try:
                    for last in job.answers():
                        n += 1
                        first = time.monotonic() - t0 if first is None else first
                        src = "from cache" if last.from_cache else ""
                        bar.update(round(100 * last.coverage, 1), src, force=True)
                    bar.done(round(100 * last.coverage, 1) if last else 0)
                except KeyboardInterrupt:
                    job.cancel()
                    bar.done(round(100 * last.coverage, 1) if last else 0, "canceled")
                    print("rpg hist: canceled", file=sys.stderr)
                    return 130
                except rpg.MapReduceError as exc:
                    bar.done(round(100 * last.coverage, 1) if last else 0, "failed")
                    print(f"rpg hist: {exc}", file=sys.stderr)
                    return 1
            finally:
                mr.close()
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)
    assert last is not None
    value = last.value
    if args.json:
        out = {"kind": args.kind, "files": paths, "start": args.start, "end": job.end,
               "value": value.tolist() if isinstance(value, np.ndarray) else value,
               "answers": job.answered, "shown": n, "first_answer_s": round(first or 0.0, 4),
               "seconds": round(time.monotonic() - t0, 4), "job": job.id}
        print(json.dumps(out))
    else:
        print(render(args.kind, value))
    return 0
