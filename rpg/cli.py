"""The ``rpg`` command: ``rpg run`` (a real workload on a local pilot), ``rpg report``,
``rpg stress`` (the slow-disk harness)."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections import Counter
from typing import Any

from rpg import states

STATE_ORDER = ["NEW", "BOUND", "STAGING_IN", "SCHEDULING", "EXECUTING", "STAGING_OUT",
               "DONE", "FAILED", "CANCELED"]
SHORT = {"NEW": "new", "BOUND": "bound", "STAGING_IN": "stage-in", "SCHEDULING": "sched",
         "EXECUTING": "exec", "STAGING_OUT": "stage-out", "DONE": "done", "FAILED": "failed",
         "CANCELED": "canceled"}


class Progress:
    """A one-line progress bar of units by state (redrawn on a TTY, a line a second otherwise)."""

    def __init__(self, total: int, stream: Any = sys.stderr, width: int = 30) -> None:
        self.total = total
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self.t0 = time.monotonic()
        self._last_line = 0.0

    def line(self, counts: Counter) -> str:
        final = sum(counts[s] for s in states.FINAL)
        filled = int(self.width * final / max(1, self.total))
        bar = "#" * filled + "." * (self.width - filled)
        parts = " ".join(f"{SHORT[s]}={counts[s]}" for s in STATE_ORDER if counts[s])
        return f"[{bar}] {final}/{self.total} {time.monotonic() - self.t0:6.1f}s  {parts}"

    def update(self, counts: Counter, force: bool = False) -> None:
        text = self.line(counts)
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
        elif force or time.monotonic() - self._last_line >= 1.0:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_line = time.monotonic()

    def done(self, counts: Counter) -> None:
        self.update(counts, force=True)
        if self.tty:
            self.stream.write("\n")


def _make_inputs(workdir: str, n: int, size: int) -> list[tuple[str, str]]:
    """n input files of random bytes, with their expected sha256."""
    os.makedirs(workdir, exist_ok=True)
    out = []
    for i in range(n):
        path = os.path.join(workdir, f"chunk-{i:05d}.bin")
        data = os.urandom(size)
        with open(path, "wb") as fh:
            fh.write(data)
        out.append((path, hashlib.sha256(data).hexdigest()))
    return out


def cmd_run(args: argparse.Namespace) -> int:
    import rpg
    from rpg.log import read_profile
    from rpg.report import analyze, format_summary

    if args.units < 1:
        print("rpg run: --units must be at least 1", file=sys.stderr)
        return 2
    if args.cores < 1:
        print("rpg run: --cores must be at least 1", file=sys.stderr)
        return 2
    sandbox = os.path.abspath(args.sandbox or f"rpg-run.{time.strftime('%Y%m%d-%H%M%S')}")
    inputs = _make_inputs(os.path.join(sandbox, "inputs"), args.units, args.input_kb * 1024)
    results = os.path.join(sandbox, "results")
    print(f"rpg run: {args.units} units on a local pilot with {args.cores} cores; "
          f"sandbox {sandbox}")
    t0 = time.time()
    with rpg.Session(sandbox=os.path.join(sandbox, "session")) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(resource="local", cores=args.cores,
                                                        runtime=args.runtime))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        descs = []
        for i, (path, _) in enumerate(inputs):
            descs.append(rpg.UnitDescription(
                name=f"sha-{i}",
                executable="/bin/sh",
                arguments=["-c", "sha256sum chunk.bin | cut -d' ' -f1 > sum.txt; "
                                 "wc -c < chunk.bin"],
                input_staging=[{"source": path, "target": "chunk.bin", "action": "copy"}],
                output_staging=[{"source": "sum.txt",
                                 "target": os.path.join(results, f"{i:05d}.sum")}],
            ))
        units = umgr.submit_units(descs)
        progress = Progress(len(units))
        while True:
            counts = Counter(u.state for u in units)
            progress.update(counts)
            if sum(counts[s] for s in states.FINAL) == len(units):
                break
            if pilot.final:
                umgr.wait_units(timeout=10)
                break
            time.sleep(0.1)
        progress.done(Counter(u.state for u in units))
        profile = session.profile_path
    wall = time.time() - t0
    ok = 0
    for i, (_, sha) in enumerate(inputs):
        try:
            with open(os.path.join(results, f"{i:05d}.sum")) as fh:
                ok += fh.read().strip() == sha
        except OSError:
            pass
    summary = analyze(read_profile(profile))
    print(format_summary(summary, title="rpg run summary"))
    print(f"{'results verified':<22}  {ok}/{len(units)} sha256 sums match")
    print(f"{'wall time':<22}  {wall:.2f} s (session start to close)")
    failed = [u for u in units if u.state != states.DONE]
    for u in failed[:5]:
        print(f"  {u.uid} {u.state}: {u.reason}")
    if pilot.state == states.FAILED:
        print(f"pilot {pilot.uid} FAILED: {pilot.reason}")
    return 0 if ok == len(units) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from rpg.log import read_profile
    from rpg.report import analyze, format_summary

    path = args.profile
    if os.path.isdir(path):
        path = os.path.join(path, "profile.jsonl")
    try:
        events = read_profile(path)
    except OSError as exc:
        print(f"rpg report: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"rpg report: {path} is not a profile (JSON lines): {exc}", file=sys.stderr)
        return 2
    print(format_summary(analyze(events), title=f"rpg report: {path}"))
    print_profile_damage(events)
    return 0


def print_profile_damage(events: Any) -> None:
    """Say what reading the profile had to skip (damaged lines, events the writer dropped)."""
    if getattr(events, "damaged", 0):
        n = events.damaged
        print(f"{n} damaged line{'s' if n != 1 else ''} skipped (first: {events.problem})")
    if getattr(events, "dropped", 0):
        print(f"{events.dropped} events missing: the profile writer dropped them (disk full)")


def cmd_stress(rest: list[str]) -> int:
    from tools.simulated_disk_io import stress

    return int(stress.main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stress"]:
        return cmd_stress(argv[1:])
    ap = argparse.ArgumentParser(prog="rpg", description="rpg: pilot jobs for Python on gevent")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="a real workload (sha256 of staged chunks), local pilot")
    run.add_argument("--units", type=int, default=200, help="number of units (default 200)")
    run.add_argument("--cores", type=int, default=4, help="pilot cores (default 4)")
    run.add_argument("--input-kb", type=int, default=64, help="input chunk size in KiB (64)")
    run.add_argument("--runtime", type=float, default=30, help="pilot runtime, minutes (30)")
    run.add_argument("--sandbox", help="where inputs, results and the session go")
    rep = sub.add_parser("report", help="overheads, throughput, concurrency from a profile")
    rep.add_argument("profile", help="profile.jsonl, or a session sandbox holding one")
    sub.add_parser("stress", help="the slow-disk stress harness (see --help of it)")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    return cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
