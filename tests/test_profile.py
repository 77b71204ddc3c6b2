"""The session profile on a full disk, and reading back a damaged one.

A full disk is simulated without root mounts: in a subprocess, RLIMIT_FSIZE (with SIGXFSZ
ignored) makes a write past the limit fail with EFBIG after a partial write, exactly as a disk
filling up mid-write does; /dev/full gives ENOSPC.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from rpg.log import ProfileWriter, read_profile
from rpg.report import analyze

RPG = [sys.executable, "-m", "rpg.cli"]


def run_script(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last stdout line."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["stderr"] = out.stderr
    return result


def lines_of(path) -> list[dict]:
    """Every line of the file, each of which must be one whole JSON object."""
    with open(path, "rb") as fh:
        data = fh.read()
    assert data.endswith(b"\n"), data[-200:]
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


FSIZE_SCRIPT = """
    import json, os, resource, signal, sys
    from rpg.log import ProfileWriter
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    path = sys.argv[1]
    w = ProfileWriter(path)
    seq = 0
    def add(n):
        global seq
        for _ in range(n):
            w.add(1000.0 + seq, f"unit.{seq:06d}", "NEW", "hub", reason="x" * 40)
            seq += 1
    obs = {}
    add(50)
    obs["first"] = w.flush()
    size = os.path.getsize(path)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    # room for a few lines, not for the next batch: the write tears a line, then fails
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 300, hard))
    errors = []
    for batch in (200, 100):
        add(batch)
        try:
            w.flush()
            errors.append(None)
        except OSError as exc:
            errors.append(exc.errno)
        obs.setdefault("sizes", []).append(os.path.getsize(path))
        obs.setdefault("pending", []).append(w.pending())
    obs["errors"] = errors
    obs["size_before"] = size
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    add(25)
    obs["after"] = w.flush()
    obs["pending_after"] = w.pending()
    obs["written"] = w.events_written
    print(json.dumps(obs))
"""


def test_full_disk_mid_write_leaves_no_torn_line_and_keeps_every_event_for_the_retry(tmp_path):
    path = tmp_path / "profile.jsonl"
    obs = run_script(FSIZE_SCRIPT, str(path))
    assert obs["first"] == 50
    assert obs["errors"] == [27, 27]  # EFBIG, reported to the caller both times
    # cut back to the size before each failed write: never a partial line on disk
    assert obs["sizes"] == [obs["size_before"], obs["size_before"]]
    assert obs["pending"] == [200, 300]  # kept, not dropped
    assert obs["after"] == 325 and obs["pending_after"] == 0 and obs["written"] == 375
    recs = lines_of(path)
    uids = [r["uid"] for r in recs]
    assert uids == [f"unit.{i:06d}" for i in range(375)]  # each once, in order


def test_profile_write_to_dev_full_raises_enospc_and_keeps_events_in_order(tmp_path):
    w = ProfileWriter("/dev/full")
    for i in range(10):
        w.add(float(i), f"unit.{i:06d}", "NEW", "hub")
    try:
        w.flush()
    except OSError as exc:
        assert exc.errno == 28  # ENOSPC
    else:
        raise AssertionError("a write to /dev/full must fail")
    assert w.pending() == 10 and w.events_written == 0
    for i in range(10, 15):
        w.add(float(i), f"unit.{i:06d}", "NEW", "hub")
    w.path = str(tmp_path / "profile.jsonl")  # the disk has room again
    assert w.flush() == 15
    assert [r["uid"] for r in lines_of(w.path)] == [f"unit.{i:06d}" for i in range(15)]


CAP_SCRIPT = """
    import json, sys
    from rpg.log import ProfileWriter
    w = ProfileWriter("/dev/full", max_kept=10)
    for i in range(30):
        w.add(float(i), f"unit.{i:06d}", "NEW", "hub")
    for _ in range(2):
        try:
            w.flush()
        except OSError:
            pass
    obs = {"pending": w.pending(), "dropped": w.dropped}
    w.path = sys.argv[1]
    obs["written"] = w.flush()
    print(json.dumps(obs))
"""


def test_a_disk_full_for_long_caps_kept_events_counts_the_dropped_and_warns(tmp_path):
    path = tmp_path / "profile.jsonl"
    obs = run_script(CAP_SCRIPT, str(path))
    assert obs["pending"] == 10 and obs["dropped"] == 20
    warnings = [json.loads(line) for line in obs["stderr"].splitlines()
                if "profile_events_dropped" in line]
    assert len(warnings) == 1 and warnings[0]["dropped"] == 20, obs["stderr"]
    assert warnings[0]["level"] == "warning"
    assert obs["written"] == 10
    recs = lines_of(path)
    # the gap is marked where it is, then the newest ten events follow
    assert recs[0]["state"] == "EVENTS_DROPPED" and recs[0]["dropped"] == 20
    assert [r["uid"] for r in recs[1:]] == [f"unit.{i:06d}" for i in range(20, 30)]
    got = read_profile(str(path))
    assert got.dropped == 20 and len(got) == 10
    rep = subprocess.run(RPG + ["report", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert rep.returncode == 0, rep.stderr
    assert "20 events missing" in rep.stdout


def test_profile_writer_appends_after_a_torn_line_left_by_an_earlier_crash(tmp_path):
    path = tmp_path / "profile.jsonl"
    path.write_bytes(b'{"time": 1.0, "uid": "unit.000000", "state": "NEW"}\n{"time": 2.0, "ui')
    w = ProfileWriter(str(path))
    w.add(3.0, "unit.000001", "NEW", "hub")
    assert w.flush() == 1
    recs = read_profile(str(path))
    assert [r["uid"] for r in recs] == ["unit.000000", "unit.000001"]
    assert recs.damaged == 1


def write_damaged_profile(path) -> None:
    w = ProfileWriter(str(path))
    for i in range(4):
        w.add(10.0, f"unit.{i:06d}", "NEW", "hub")
        w.add(11.0, f"unit.{i:06d}", "EXECUTING", "agent")
        w.add(12.0, f"unit.{i:06d}", "DONE", "agent")
    w.flush()
    with open(path, "ab") as fh:
        fh.write(b'{"time": "abc", "uid": "unit.000009", "state": "DONE"}\n')
        fh.write(b'{"time": 12.0, "uid": 5, "state": "DONE"}\n')
        fh.write(b'[1, 2, 3]\n')
        fh.write(b'\xff\xfe garbage \x00\x00\n')
        fh.write(b'{"time": NaN, "uid": "unit.000008", "state": "DONE"}\n')
        fh.write(b'{"time": 13.0, "uid": "unit.0000')  # torn by a full disk


def test_rpg_report_skips_and_counts_damaged_and_wrongly_typed_lines(tmp_path):
    path = tmp_path / "profile.jsonl"
    write_damaged_profile(path)
    recs = read_profile(str(path))
    assert len(recs) == 12 and recs.damaged == 6
    assert recs.problem == "line 13: 'time' must be a finite number, got 'abc'"
    rep = subprocess.run(RPG + ["report", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert rep.returncode == 0, rep.stderr
    assert "Traceback" not in rep.stderr
    assert "6 damaged lines skipped" in rep.stdout
    assert "units DONE" in rep.stdout and " 4\n" in rep.stdout


def test_rpg_report_on_only_wrongly_typed_records_is_a_clear_error(tmp_path):
    path = tmp_path / "profile.jsonl"
    path.write_text('{"time": "abc", "uid": "unit.000001", "state": "DONE"}\n'
                    '{"time": 1.0, "uid": 5, "state": "DONE"}\n')
    rep = subprocess.run(RPG + ["report", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert rep.returncode == 2
    assert "Traceback" not in rep.stderr
    assert "not a profile" in rep.stderr and "2 damaged lines" in rep.stderr
    assert "'time' must be a finite number" in rep.stderr


def test_analyze_skips_wrongly_typed_records_instead_of_raising():
    good = [{"time": 1.0, "uid": "unit.000001", "state": "NEW"},
            {"time": 2.0, "uid": "unit.000001", "state": "DONE"}]
    bad = [{"time": "abc", "uid": "unit.000002", "state": "DONE"},
           {"time": 1.0, "uid": 5, "state": "DONE"},
           [1, 2], "text", None,
           {"time": True, "uid": "unit.000003", "state": "DONE"},
           {"time": 1.0, "uid": "unit.000004", "state": ["DONE"]},
           {"uid": "unit.000005", "state": "DONE"}]
    a = analyze(good + bad)
    assert a["counts"]["DONE"] == 1 and a["units"] == 1
    assert a["skipped_records"] == len(bad)


def test_profile_event_that_cannot_be_serialised_does_not_block_the_others(tmp_path):
    w = ProfileWriter(str(tmp_path / "profile.jsonl"))
    w.add(1.0, "unit.000000", "NEW", "hub")
    w.add(2.0, "unit.000001", "FAILED", "hub", detail={("a", 1): "tuple key"})
    w.add(3.0, "unit.000002", "NEW", "hub")
    assert w.flush() == 3
    recs = read_profile(w.path)
    assert [r["uid"] for r in recs] == ["unit.000000", "unit.000001", "unit.000002"]
    assert recs.damaged == 0 and "tuple key" in recs[1]["unserialisable"]
    w.add(4.0, "unit.000003", "NEW", "hub")
    assert w.flush() == 1 and w.pending() == 0


def test_every_event_reads_back_as_json_dumps_would_have_written_it(tmp_path):
    """The writer formats plain events itself (rpg/log.py's fast path) and hands the rest to
    json.dumps; either way a line reads back as the event, secrets redacted, bulky fields out."""
    events = [
        (1796000000.1234567, "unit.000001", "DONE", "agent",
         {"exit_code": 0, "stdout": "out", "stderr": "", "sandbox": "/s/unit.000001"}),
        (1796000001.5, "unit.000002", "BOUND", "hub", {"pilot": "pilot.000001", "cores": 4}),
        (2.0, "unit.000003", "FAILED", "hub", {"token": "s3cret", "exit_code": None,
                                               "reason": "exit code 1; {}[] ~ it's"}),
        (3.0, 'unit"quote', "NEW", "hub", {}),
        (4.0, "u", "NEW", "hub", {"reason": "caf\u00e9 \\ back\nslash\ttab \x7f"}),
        (5.0, "u", "NEW", "hub", {"ratio": 0.25, "nan": float("nan"), "flag": True}),
        (6, "u", "NEW", "hub", {"n": 10 ** 30, "neg": -1}),
        (7.0, "u\ud800", "NEW", "hub", {"key\"": 1, "list": [1, "a"]}),
    ]
    w = ProfileWriter(str(tmp_path / "profile.jsonl"))
    for t, uid, state, comp, extra in events:
        w.add(t, uid, state, comp, **extra)
    assert w.flush() == len(events)
    got = lines_of(w.path)
    for (t, uid, state, comp, extra), line in zip(events, got, strict=True):
        want = {"time": round(t, 6), "uid": uid, "state": state, "component": comp}
        want.update((k, "<redacted>" if k == "token" else v) for k, v in extra.items()
                    if k not in ("stdout", "stderr"))
        assert json.loads(json.dumps(want)) == line or (t == 5.0 and line["nan"] != line["nan"])
    assert got[0]["time"] == 1796000000.123457 and "stdout" not in got[0]
    assert got[2]["token"] == "<redacted>" and got[6]["n"] == 10 ** 30
