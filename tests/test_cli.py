"""The rpg command as a user runs it: `rpg run` end to end, `rpg report`, bad arguments."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

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
    # the directory `rpg run` printed (its newest session), with plots and a page
    png, page = tmp_path / "report.png", tmp_path / "report.html"
    rep = run(["report", str(tmp_path / "work"), "--plot", str(png), "--html", str(page)],
              cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    assert re.search(r"units DONE\s+30\n", rep.stdout) and "session/profile.jsonl" in rep.stdout
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.shape[:2] == (800, 1200), img.shape  # 12 x 8 in at 100 dpi
    assert 20_000 < png.stat().st_size < 2_000_000
    assert img[..., :3].std() > 0.05, "a blank picture"  # lines and areas, not one colour
    text = page.read_text()
    assert "data:image/png;base64," in text and "units DONE" in text and "<script" not in text
    # self-contained: nothing fetched (the base64 of the embedded PNG may spell "http" by chance:
    # a fresh venv's run caught one)
    markup = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "http" not in markup.replace("http-equiv", "")


def test_rpg_bad_arguments_say_what_is_wrong(tmp_path):
    out = run(["run", "--units", "0"], cwd=tmp_path)
    assert out.returncode == 2 and "--units must be at least 1" in out.stderr
    out = run(["run", "--cores", "x"], cwd=tmp_path)
    assert out.returncode == 2 and "--cores" in out.stderr
    out = run(["report", str(tmp_path / "nope")], cwd=tmp_path)
    assert out.returncode == 2 and "cannot read" in out.stderr
    (tmp_path / "empty").mkdir()
    out = run(["report", str(tmp_path / "empty")], cwd=tmp_path)
    assert out.returncode == 2 and "no profile.jsonl there" in out.stderr
    (tmp_path / "empty").rmdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    out = run(["report", str(bad)], cwd=tmp_path)
    assert out.returncode == 2 and "not a profile" in out.stderr
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing made for a refused run


def test_rpg_run_refuses_bad_values_in_one_line_naming_the_option(tmp_path):
    for args, option, words in [
        (["--input-kb", "-1"], "--input-kb", "between 0 and"),
        (["--runtime", "0"], "--runtime", "must be > 0"),
        (["--runtime", "nan"], "--runtime", "must be > 0"),
        (["--cores", "-3"], "--cores", "at least 1"),
    ]:
        out = run(["run", "--units", "3", *args], cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and option in lines[0] and words in lines[0], (args, out.stderr)
    assert os.listdir(tmp_path) == []  # nothing made for a refused run


def test_rpg_run_with_a_sandbox_it_cannot_create_says_so_without_a_traceback(tmp_path):
    regular = tmp_path / "a-file"
    regular.write_text("")
    for sandbox in ("/proc/rpg-x", str(regular / "work")):
        out = run(["run", "--units", "3", "--sandbox", sandbox], cwd=tmp_path)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "Traceback" not in out.stderr, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"--sandbox {sandbox}: cannot create it" in lines[0], lines


def _listing(path) -> int:
    try:
        return len(os.listdir(path))
    except FileNotFoundError:
        return 0


def _session_processes(sandbox) -> list[int]:
    """Live processes `rpg run --sandbox sandbox` made: its agent (the path is in its command
    line) and its units (RPG_PILOT_KEY=<session uid>/<pilot uid> in their environment)."""
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{name}/environ", "rb") as fh:
                environ = fh.read()
        except (OSError, IndexError):
            continue
        if b"rpg.cli" in cmdline:
            continue  # rpg run itself: its exit is checked by its return code
        if str(sandbox).encode() in cmdline or (b"RPG_PILOT_KEY=" in environ
                                                and str(sandbox).encode() in environ):
            found.append(int(name))
    return found


def test_rpg_run_ctrl_c_exits_130_with_a_summary_and_leaves_no_process(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.Popen(RPG + ["run", "--units", "5000", "--cores", "2", "--input-kb", "1",
                                   "--sandbox", str(work)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while _listing(work / "results") < 10 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert _listing(work / "results") >= 10
        assert _session_processes(work)  # the agent is running: the check below sees it
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert "rpg run summary" in stdout
    done = int(re.search(r"units DONE\s+(\d+)\n", stdout).group(1))
    canceled = int(re.search(r"units CANCELED\s+(\d+)\n", stdout).group(1))
    assert done >= 10 and canceled >= 1
    assert re.search(rf"interrupted\s+Ctrl-C after {done} units done; {canceled} canceled by "
                     r"the session close, \d+ never submitted", stdout), stdout
    assert len(re.findall(r"^units \d+/5000 ", stderr, re.M)) >= 2  # the bar kept going
    assert wait_gone(work) == []


def wait_gone(sandbox, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _session_processes(sandbox)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_rpg_run_generates_inputs_a_bounded_window_ahead_of_completions(tmp_path):
    work = tmp_path / "work"
    units, window = 400, 2 * 1 + 64  # --cores 1
    proc = subprocess.Popen(RPG + ["run", "--units", str(units), "--cores", "1",
                                   "--input-kb", "1", "--sandbox", str(work)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ahead = []
    try:
        while proc.poll() is None:
            made = _listing(work / "inputs")
            finished = _listing(work / "results")  # a unit's result is there before it is DONE
            if made:
                ahead.append(made - finished)
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stdout + stderr
    assert f"{units}/{units} sha256 sums match" in stdout
    assert ahead and max(ahead) <= window, max(ahead)
