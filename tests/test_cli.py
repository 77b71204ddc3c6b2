"""The rpg command as a user runs it: `rpg run` end to end, `rpg report`, bad arguments."""

from __future__ import annotations

import os
import re
import subprocess
import sys

RPG = [sys.executable, "-m", "rpg.cli"]


def run(args, cwd, timeout=120):
    return subprocess.run(RPG + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_rpg_run_small_workload_and_report(tmp_path):
    out = run(["run", "--units", "30", "--cores", "2", "--input-kb", "8",
               "--sandbox", str(tmp_path / "work")], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "30/30 sha256 sums match" in out.stdout
    assert re.search(r"units DONE\s+30\n", out.stdout)
    assert "throughput" in out.stdout and "pilot NEW -> ACTIVE" in out.stdout
    assert "30/30" in out.stderr  # the progress bar's last line (not a TTY: plain lines)
    assert len(os.listdir(tmp_path / "work" / "results")) == 30
    rep = run(["report", str(tmp_path / "work" / "session")], cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    assert re.search(r"units DONE\s+30\n", rep.stdout)


def test_rpg_bad_arguments_say_what_is_wrong(tmp_path):
    out = run(["run", "--units", "0"], cwd=tmp_path)
    assert out.returncode == 2 and "--units must be at least 1" in out.stderr
    out = run(["run", "--cores", "x"], cwd=tmp_path)
    assert out.returncode == 2 and "--cores" in out.stderr
    out = run(["report", str(tmp_path / "nope")], cwd=tmp_path)
    assert out.returncode == 2 and "cannot read" in out.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    out = run(["report", str(bad)], cwd=tmp_path)
    assert out.returncode == 2 and "not a profile" in out.stderr
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing made for a refused run
