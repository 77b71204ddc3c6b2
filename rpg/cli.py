"""The ``rpg`` command: ``rpg run`` (a real workload on a local pilot), ``rpg report``,
``rpg hist`` (rpg.MapReduce), ``rpg stress`` (the slow-disk harness), ``rpg hub``."""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

from rpg import gc_policy, states
from rpg.mapreduce import command as hist_command

STATE_ORDER = [*states.UNIT_PATH, states.FAILED, states.CANCELED]
SHORT = {"NEW": "new", "BOUND": "bound", "STAGING_IN": "stage-in", "SCHEDULING": "sched",
         "EXECUTING": "exec", "STAGING_OUT": "stage-out", "DONE": "done", "FAILED": "failed",
         "CANCELED": "canceled"}


class Progress:
    """``rpg run``'s bar of units by state (rpg.progress: rich on a terminal, plain lines
    otherwise)."""

    def __init__(self, total: int, stream: Any = None) -> None:
        from rpg.progress import ProgressBar

        self.total = total
        self.bar = ProgressBar(total, "units", stream)

    @staticmethod
    def text(counts: Counter, todo: int = 0) -> str:
        """``todo``: units not submitted yet (their inputs are made as others finish)."""
        parts = " ".join(f"{SHORT[s]}={counts[s]}" for s in STATE_ORDER if counts[s])
        return f"{parts} todo={todo}".strip() if todo else parts

    def update(self, counts: Counter, force: bool = False, todo: int = 0) -> None:
        final = sum(counts[s] for s in states.FINAL)
        self.bar.update(final, self.text(counts, todo), force=force)

    def done(self, counts: Counter, todo: int = 0) -> None:
        self.bar.done(sum(counts[s] for s in states.FINAL), self.text(counts, todo))


MAX_INPUT_KB = 1024 * 1024  # one chunk is read into memory: at most 1 GiB


def _make_input(workdir: str, i: int, size: int) -> tuple[str, str]:
    """Input file ``i`` of random bytes, and its expected sha256."""
    path = os.path.join(workdir, f"chunk-{i:05d}.bin")
    data = os.urandom(size)
    with open(path, "wb") as fh:
        fh.write(data)
    return path, hashlib.sha256(data).hexdigest()


def _unit_description(i: int, path: str, results: str) -> Any:
    import rpg

    return rpg.UnitDescription(
        name=f"sha-{i}",
        executable="/bin/sh",
        arguments=["-c", "sha256sum chunk.bin | cut -d' ' -f1 > sum.txt; wc -c < chunk.bin"],
        # client://: the application's files, wherever the hub and the pilot run (through the
        # hub service's relay for `rpg run --hub`)
        input_staging=[{"source": f"client://{path}", "target": "chunk.bin", "action": "copy"}],
        output_staging=[{"source": "sum.txt",
                         "target": "client://" + os.path.join(results, f"{i:05d}.sum")}],
    )


def _run_args_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with ``rpg run``'s arguments (one line naming the option), or None."""
    import rpg
    from rpg.description import DescriptionError

    if args.units < 1:
        return "--units must be at least 1"
    if args.cores < 1:
        return "--cores must be at least 1"
    if not 0 <= args.input_kb <= MAX_INPUT_KB:
        return f"--input-kb must be between 0 and {MAX_INPUT_KB}, got {args.input_kb}"
    try:
        rpg.PilotDescription(resource="local", cores=args.cores, runtime=args.runtime)
    except DescriptionError as exc:
        unit = " (minutes)" if exc.field == "runtime" else ""
        return f"--{exc.field.replace('_', '-')}{unit} {exc.problem}"
    return None


class _CtrlC:
    """SIGINT sets a flag the run loop checks, so Ctrl-C never lands as KeyboardInterrupt in
    the middle of rpg's calls; the run then closes its session (canceling what is unfinished)."""

    def __init__(self) -> None:
        self.hit = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.hit = True


def cmd_run(args: argparse.Namespace) -> int:
    problem = _run_args_problem(args)
    if problem:
        print(f"rpg run: {problem}", file=sys.stderr)
        return 2
    sandbox = os.path.abspath(args.sandbox or f"rpg-run.{time.strftime('%Y%m%d-%H%M%S')}")
    inputs, results = os.path.join(sandbox, "inputs"), os.path.join(sandbox, "results")
    try:
        os.makedirs(inputs, exist_ok=True)
        os.makedirs(results, exist_ok=True)
    except OSError as exc:
        print(f"rpg run: --sandbox {sandbox}: cannot create it: {exc.strerror}", file=sys.stderr)
        return 2
    gc_policy.install()  # rpg's own process: full collections when its hub's loop is quiet
    ctrl_c = _CtrlC()
    main = threading.current_thread() is threading.main_thread()  # signals go to it only
    previous = signal.signal(signal.SIGINT, ctrl_c) if main else None
    try:
        return _run(args, sandbox, inputs, results, ctrl_c)
    finally:
        if previous is not None:  # None: a handler not set from Python; nothing to restore
            signal.signal(signal.SIGINT, previous)


def _run(args: argparse.Namespace, sandbox: str, inputs: str, results: str,
         ctrl_c: _CtrlC) -> int:
    """The workload: inputs are generated and submitted in batches, at most ``window`` units
    ahead of completions, so a big run starts at once and never holds all its inputs."""
    import rpg
    from rpg.log import read_profile
    from rpg.report import analyze, format_summary

    total, window = args.units, 2 * args.cores + 64
    print(f"rpg run: {total} units on a local pilot with {args.cores} cores; sandbox {sandbox}",
          flush=True)
    t0 = time.time()
    shas: list[str] = []  # expected sum of unit i
    units: list[Any] = []  # every unit submitted, in order
    active: list[Any] = []  # submitted, not final yet
    finals: Counter = Counter()
    error = None
    try:  # a sandbox used before keeps its sessions: this one gets a directory of its own
        session_dir = os.path.join(sandbox, "session")
        n = 1
        while os.path.exists(session_dir):
            n += 1
            session_dir = os.path.join(sandbox, f"session.{n}")
        session = (rpg.Session(hub=args.hub) if args.hub else
                   rpg.Session(sandbox=session_dir))
    except (OSError, rpg.SessionError) as exc:
        print(f"rpg run: --sandbox {sandbox}: cannot start the session: "
              f"{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    with session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(resource="local", cores=args.cores,
                                                        runtime=args.runtime))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        progress = Progress(total)
        while not ctrl_c.hit:
            still = []
            for u in active:
                st = u.state
                if st in states.FINAL:
                    finals[st] += 1
                else:
                    still.append(u)
            active = still
            room = min(window - len(active), total - len(units))
            if room > 0 and error is None and not pilot.final:
                descs = []
                try:
                    for i in range(len(units), len(units) + room):
                        if ctrl_c.hit:
                            break
                        path, sha = _make_input(inputs, i, args.input_kb * 1024)
                        shas.append(sha)
                        descs.append(_unit_description(i, path, results))
                except OSError as exc:
                    error = f"cannot write input {len(shas)} in {inputs}: {exc.strerror}"
                if ctrl_c.hit:  # they would only be canceled: leave them out
                    del shas[len(units):]
                    descs = []
                if descs:
                    batch = umgr.submit_units(descs)
                    units += batch
                    active += batch
            progress.update(finals + Counter(u.state for u in active), todo=total - len(units))
            if not active and (len(units) == total or error is not None):
                break
            if pilot.final:
                umgr.wait_units([u.uid for u in active], timeout=10)
                break
            time.sleep(0.1)
        if ctrl_c.hit:
            print("\nrpg run: interrupted; closing the session (unfinished units are canceled)",
                  file=sys.stderr, flush=True)
        profile = session.profile_path
    # closed: every submitted unit is final now (the close canceled the unfinished ones)
    counts = Counter(u.state for u in units)
    progress.done(counts, todo=total - len(units))
    wall = time.time() - t0
    ok = 0
    for i, sha in enumerate(shas):
        try:
            with open(os.path.join(results, f"{i:05d}.sum")) as fh:
                ok += fh.read().strip() == sha
        except OSError:
            pass
    try:
        events = read_profile(profile)
        print(format_summary(analyze(events), title="rpg run summary"))
        print_profile_damage(events)
    except (OSError, ValueError) as exc:
        print(f"rpg run: the profile {profile} is unreadable: {exc}")
    print(f"{'results verified':<22}  {ok}/{total} sha256 sums match")
    print(f"{'wall time':<22}  {wall:.2f} s (session start to close)")
    if ctrl_c.hit:
        print(f"{'interrupted':<22}  Ctrl-C after {counts[states.DONE]} units done; "
              f"{counts[states.CANCELED]} canceled by the session close, "
              f"{total - len(units)} never submitted")
    if error:
        print(f"rpg run: {error}")
    # after Ctrl-C, the canceled ones are said above
    failed = [u for u in units if u.state != states.DONE
              and not (ctrl_c.hit and u.state == states.CANCELED)]
    for u in failed[:5]:
        print(f"  {u.uid} {u.state}: {u.reason}")
    if pilot.state == states.FAILED:
        print(f"pilot {pilot.uid} FAILED: {pilot.reason}")
    if ctrl_c.hit:
        return 130
    return 0 if ok == total else 1


def cmd_report(args: argparse.Namespace) -> int:
    from rpg.log import read_profile
    from rpg.report import Timeline, analyze, format_summary

    path = find_profile(args.profile)
    if path is None:
        print(f"rpg report: {args.profile}: no profile.jsonl there, nor in a session "
              f"directory below it (give the profile, a session sandbox, or the sandbox "
              f"`rpg run` printed)", file=sys.stderr)
        return 2
    try:
        events = read_profile(path)
    except OSError as exc:
        print(f"rpg report: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"rpg report: {path} is not a profile (JSON lines): {exc}", file=sys.stderr)
        return 2
    tl = Timeline(events)
    print(format_summary(analyze(tl), title=f"rpg report: {path}"))
    print_profile_damage(events)
    for out, write in ((args.plot, "write_png"), (args.html, "write_html")):
        if not out:
            continue
        from rpg import plots

        try:
            if write == "write_png":
                plots.write_png(tl, out)
            else:
                plots.write_html(tl, out, f"rpg report: {path}")
        except OSError as exc:
            print(f"rpg report: cannot write {out}: {exc.strerror}", file=sys.stderr)
            return 2
        print(f"{'wrote':<22}  {out}")
    return 0


def find_profile(path: str) -> str | None:
    """The profile at ``path``: the file itself, a session sandbox's profile.jsonl, or, in a
    directory of sessions (what `rpg run --sandbox` makes: session, session.2, ...), the
    newest session's."""
    if not os.path.isdir(path):
        return path
    own = os.path.join(path, "profile.jsonl")
    if os.path.exists(own):
        return own
    found = []
    try:
        names = os.listdir(path)
    except OSError:
        return None
    for name in names:
        candidate = os.path.join(path, name, "profile.jsonl")
        try:
            found.append((os.stat(candidate).st_mtime, candidate))
        except OSError:
            continue
    return max(found)[1] if found else None


def print_profile_damage(events: Any) -> None:
    """Say what reading the profile had to skip (damaged lines, events the writer dropped)."""
    if getattr(events, "damaged", 0):
        n = events.damaged
        print(f"{n} damaged line{'s' if n != 1 else ''} skipped (first: {events.problem})")
    if getattr(events, "dropped", 0):
        print(f"{events.dropped} events missing: the profile writer dropped them (disk full)")


def cmd_hub(args: argparse.Namespace) -> int:
    """``rpg hub serve|token|status|stop``."""
    import json

    from rpg import client

    if args.hub_cmd == "serve":
        from rpg.hub.serve import HubServer, ServeError
        from rpg.sandbox import SandboxError

        def ready(address: str, access: str) -> None:
            print(f"rpg hub serve: listening on {address}; access file {access}",
                  file=sys.stderr, flush=True)
            if server.dashboard is not None:
                print(f"rpg hub serve: dashboard at {server.dashboard.url()} (give it a "
                      f"user's token)", file=sys.stderr, flush=True)

        gc_policy.install()  # the service's process is rpg's own (see rpg/gc_policy.py)
        try:
            server = HubServer(args.sandbox, args.address, args.max_units_per_user,
                               args.dashboard, journal=not args.no_journal)
            return server.serve(ready)
        except (ServeError, SandboxError, OSError) as exc:
            print(f"rpg hub serve: {exc}", file=sys.stderr)
            return 2
    if args.hub_cmd == "token":
        from rpg.hub.users import ACCESS_FILE, Users, UsersError, access, read_access_file

        users = Users(os.path.abspath(args.sandbox))
        try:
            if args.revoke:
                if not users.revoke(args.name):
                    print(f"rpg hub token: no user {args.name!r}", file=sys.stderr)
                    return 1
                print(f"rpg hub token: {args.name} revoked", file=sys.stderr)
                return 0
            served = read_access_file(os.path.join(args.sandbox, ACCESS_FILE))
            if not served:
                print(f"rpg hub token: {args.sandbox} holds no {ACCESS_FILE}: start "
                      f"`rpg hub serve --sandbox {args.sandbox}` there first", file=sys.stderr)
                return 2
            if args.name == served.get("user"):
                print(f"rpg hub token: {args.name} is the hub's owner: their access file is "
                      f"{os.path.join(args.sandbox, ACCESS_FILE)} (a new token would leave "
                      f"it stale)", file=sys.stderr)
                return 2
            token = users.add(args.name)
        except (UsersError, OSError) as exc:
            print(f"rpg hub token: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(access(served["address"], token, args.name)))
        return 0
    try:
        t = client.connect(args.hub, reconnect_timeout=10.0)
    except client.SessionError as exc:
        print(f"rpg hub {args.hub_cmd}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.hub_cmd == "stop":
            t.hub_call("stop_hub")
            print(f"rpg hub stop: {t.address} is stopping", file=sys.stderr)
            return 0
        status = t.hub_call("status")
    except client.SessionError as exc:
        print(f"rpg hub {args.hub_cmd}: {exc}", file=sys.stderr)
        return 1
    finally:
        t.close()
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        print(format_hub_status(status))
    return 0


def format_hub_status(st: dict[str, Any]) -> str:
    lines = [f"hub {st['address']} (owner {st['owner']}; you are {st['user']})",
             f"front loop: lag p99 {st['loop']['lag_p99_ms']} ms, max "
             f"{st['loop']['lag_max_ms']} ms; refused calls: {st['refused'] or 'none'}",
             f"{len(st['sessions'])} session(s)"]
    for s in st["sessions"]:
        units = " ".join(f"{k}={v}" for k, v in sorted(s["units"].items())) or "no units"
        lines.append(f"  {s['uid']}  user={s['user']}{'  closed' if s['closed'] else ''}")
        lines.append(f"    units: {units}")
        for p in s["pilots"]:
            lines.append(f"    {p['uid']} {p['state']} cores {p['cores_in_use']}/{p['cores']}")
        if s.get("loop"):
            lines.append(f"    hub loop: lag p99 {s['loop']['lag_p99_ms']} ms")
        bad = [n for n, h in s.get("lanes", {}).items() if h.get("degraded")]
        lines.append(f"    lanes: {len(s.get('lanes', {}))}"
                     f"{', degraded: ' + ', '.join(bad) if bad else ''}")
    return "\n".join(lines)


def cmd_stress(rest: list[str]) -> int:
    """``rpg stress``: the slow-disk harness, installed as ``simulated_disk_io``; in a checkout
    that was not installed, ``tools.simulated_disk_io`` (found when the repo is on sys.path)."""
    try:
        from simulated_disk_io import stress
    except ModuleNotFoundError as exc:
        if exc.name != "simulated_disk_io":
            raise
        from tools.simulated_disk_io import stress

    return int(stress.main(rest, prog="rpg stress") or 0)


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
    rep.add_argument("profile", help="profile.jsonl, a session sandbox holding one, or the "
                                     "sandbox `rpg run` printed (its newest session)")
    rep.add_argument("--plot", metavar="FILE.png",
                     help="draw units by state, core utilization, concurrency and overhead")
    rep.add_argument("--html", metavar="FILE", help="a self-contained page: summary and plots")
    sub.add_parser("stress", help="the slow-disk stress harness (see --help of it)")
    hist_command.add_parser(sub)
    hub = sub.add_parser("hub", help="the hub as a service: serve, token, status, stop")
    hsub = hub.add_subparsers(dest="hub_cmd", required=True)
    serve = hsub.add_parser("serve", help="run the hub service in the foreground")
    serve.add_argument("--sandbox", required=True, help="its directory (access.json, sessions)")
    serve.add_argument("--address", help="tcp://127.0.0.1:PORT (default: the last run's, or "
                                         "a free port); loopback only")
    serve.add_argument("--dashboard", metavar="HOST:PORT",
                       help="serve the live dashboard there (127.0.0.1:0: any free port; the "
                            "page asks for a user's token)")
    serve.add_argument("--max-units-per-user", type=int, default=200000,
                       help="units not final yet one user may have (200000)")
    serve.add_argument("--no-journal", action="store_true",
                       help="journal nothing: a restart after a crash brings no session back "
                            "(bench/journal.py measures what the journal costs)")
    tok = hsub.add_parser("token", help="add a user and print their access JSON")
    tok.add_argument("--sandbox", required=True)
    tok.add_argument("name")
    tok.add_argument("--revoke", action="store_true", help="remove the user instead")
    for name, text in (("status", "sessions, pilots, units by state, lanes, loop lag"),
                       ("stop", "stop the service (as SIGTERM)")):
        p = hsub.add_parser(name, help=text)
        p.add_argument("--hub", required=True, help="an access file (or ssh://user@host/PATH)")
        p.add_argument("--json", action="store_true", help="the raw reply")
    run.add_argument("--hub", help="run through a hub service (its access file)")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "hub":
        return cmd_hub(args)
    if args.cmd == "hist":
        return hist_command.run(args)
    return cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
