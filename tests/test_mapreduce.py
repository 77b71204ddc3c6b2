"""rpg.MapReduce on real pilots: exact results against numpy, progressive answers, the chunk
cache, cancel with chunk work shared between jobs, a worker killed mid-chunk, a file changed
under a job, a stalled disk, a remote client of a real hub service, bad input, ``rpg hist``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import cloudpickle
import numpy as np
import psutil
import pytest

import rpg
from rpg import states

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the slow map travels by value

KIB = 1 << 10
MIB = 1 << 20


def slow_hist(block):
    time.sleep(0.04)
    return np.bincount(block, minlength=256)


def broken_map(block):
    raise ValueError("no map today")


def add(a, b):
    return a + b


def make_file(path, size, seed=0):
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    data[: size // 3] = 7  # not uniform: a wrong bin shows
    data.tofile(path)
    return data


def hist(data):
    return np.bincount(data, minlength=256)


def entropy(data):
    p = hist(data) / len(data)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@pytest.fixture
def pilot(session):
    return rpg.PilotManager(session).submit_pilots(rpg.PilotDescription(cores=2, runtime=5))


@pytest.fixture
def mr(session, pilot, tmp_path):
    m = rpg.MapReduce(session, [pilot], str(tmp_path / "cache"), min_chunk=64 * KIB)
    try:
        yield m
    finally:
        m.close()


def workers():
    return [p for p in psutil.Process().children(recursive=True)
            if "rpg.agent.worker" in " ".join(p.cmdline())]


def test_exact_results_progressive_answers_and_the_cache(mr, tmp_path):
    data = make_file(tmp_path / "a.bin", 5 * MIB + 12345)
    path = str(tmp_path / "a.bin")
    job = mr.submit("hist", path)
    answers = list(job.answers(timeout=60))
    cov = [a.coverage for a in answers]
    assert job.answered >= 3 and cov == sorted(cov) and cov[-1] == 1.0
    assert answers[-1].final and not any(a.final for a in answers[:-1])
    assert not any(a.from_cache for a in answers)
    assert np.array_equal(answers[-1].value, hist(data))
    assert answers[-1].value.dtype == np.int64
    names = os.listdir(tmp_path / "cache")
    assert any(n.startswith("HIST_") and n.endswith(f".0_{64 * KIB}.npy") for n in names)

    # The same request again: one answer, from the cache, final and exact, no chunk unit.
    units = mr.units
    again = list(mr.submit("hist", path).answers(timeout=60))
    assert len(again) == 1 and again[0].from_cache and again[0].final
    assert np.array_equal(again[0].value, hist(data))
    assert mr.units == units + 1  # its probe only

    # Unaligned sub-ranges: cached chunks inside, only the edges computed.
    for a, b in ((1, 2 * MIB + 17), (70_000, 5 * MIB), (3 * MIB + 5, 3 * MIB + 9)):
        job = mr.submit("hist", path, a, b)
        got = list(job.answers(timeout=60))
        assert np.array_equal(got[-1].value, hist(data[a:b])), (a, b)
        if b - a > MIB:
            assert got[0].from_cache and got[0].coverage > 0.9, (a, b, got[0])
    assert mr.units - units <= 1 + 3 * 3 + 2 * 2 * 4  # probes, and a few edges each side

    # Entropy shares the HIST chunks: answered from the cache.
    e = list(mr.submit("entropy", path).answers(timeout=60))
    assert len(e) == 1 and e[0].from_cache
    assert e[0].value == pytest.approx(entropy(data), abs=1e-12)
    assert mr.submit("entropy", path, 100, 100_000).result(60) == \
        pytest.approx(entropy(data[100:100_000]), abs=1e-12)


def test_diff_of_two_files_and_a_registered_kind(mr, tmp_path):
    a = make_file(tmp_path / "a.bin", 3 * MIB, seed=1)
    b = a.copy()
    b[[5, 70_000, 2 * MIB + 3]] ^= 0xFF
    b = b[: 3 * MIB - 1000]  # shorter: its missing tail counts as different
    b.tofile(tmp_path / "b.bin")
    paths = [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")]
    assert mr.submit("diff", paths).result(60) == 3 + 1000
    assert mr.submit("diff", paths, 6, 2 * MIB + 3).result(60) == 1
    assert any(n.startswith("DIFF_") and n.count("_") >= 3
               for n in os.listdir(tmp_path / "cache"))

    mr.register("maxbyte", lambda blk: int(blk.max()), max, zero=0)
    assert mr.submit("maxbyte", paths[0], 0, MIB).result(60) == int(a[:MIB].max())
    assert any(n.startswith("MAXBYTE_") for n in os.listdir(tmp_path / "cache"))

    # A chunk that keeps failing fails its job with the reason, after its retries.
    mr.register("broken", broken_map, add, zero=0)
    with pytest.raises(rpg.MapReduceError, match=r"ValueError: no map today \(after 3 attempts"):
        mr.submit("broken", paths[0], 0, 64 * KIB).result(60)


def test_cancel_mid_job_with_a_twin_sharing_its_chunks(mr, tmp_path):
    data = make_file(tmp_path / "a.bin", 4 * MIB)
    path = str(tmp_path / "a.bin")
    mr.register("slow", slow_hist, add, zero=np.zeros(256, np.int64))
    one = mr.submit("slow", path)
    twin = mr.submit("slow", path)
    it = one.answers(timeout=60)
    first = next(it)
    assert 0 < first.coverage < 1
    second = next(it)  # a slow consumer would get the latest; this one keeps up
    assert first.coverage < second.coverage < 1
    assert one.cancel() and one.state == rpg.mapreduce.CANCELED
    assert list(it) == []  # no more answers after cancel
    assert not one.cancel()
    assert np.array_equal(twin.result(60), hist(data))
    # 8 chunks of 512 KiB, each computed once for both jobs; two probes.
    assert mr.units == 2 + 8, mr.units

    # Alone, a canceled job stops its running chunks: its units end, the workers go idle.
    solo = mr.submit("slow", path, 0, 4 * MIB - 1)  # not cached: another end
    next(solo.answers(timeout=60))
    t = time.monotonic()
    assert mr.cancel(solo.id)
    while any(u.state not in states.FINAL for u in mr._umgr.get_units()):
        assert time.monotonic() - t < 1.5, "chunk units still running after the cancel"
        time.sleep(0.02)
    print(f"\ncancel: every chunk unit final {time.monotonic() - t:.3f} s after")
    assert not mr.cancel(solo.id) and mr.jobs() == []


def test_a_worker_killed_mid_chunk_is_rerun_elsewhere(mr, tmp_path):
    data = make_file(tmp_path / "a.bin", 4 * MIB)
    mr.register("slow", slow_hist, add, zero=np.zeros(256, np.int64))
    job = mr.submit("slow", str(tmp_path / "a.bin"))
    it = job.answers(timeout=60)
    next(it)
    victims = workers()
    assert victims
    victims[0].send_signal(signal.SIGKILL)
    answers = list(it)
    assert answers[-1].final and np.array_equal(answers[-1].value, hist(data))


def test_a_file_changed_under_a_job_fails_it(mr, tmp_path):
    make_file(tmp_path / "a.bin", 4 * MIB)
    mr.register("slow", slow_hist, add, zero=np.zeros(256, np.int64))
    job = mr.submit("slow", str(tmp_path / "a.bin"))
    it = job.answers(timeout=60)
    next(it)
    with open(tmp_path / "a.bin", "r+b") as fh:
        fh.write(b"changed")  # same size: only mtime/ctime tell
    with pytest.raises(rpg.MapReduceError, match="changed during the job"):
        list(it)
    assert job.state == rpg.mapreduce.FAILED and "a.bin" in job.reason
    # A new job sees the new version, exactly.
    data = np.fromfile(tmp_path / "a.bin", np.uint8)
    assert np.array_equal(mr.submit("hist", str(tmp_path / "a.bin")).result(60), hist(data))


def test_a_stalled_disk_holds_only_its_own_jobs(session, pilot, tmp_path):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a device of its own")
    fifo = os.path.join(shm, f"rpg-mr-stall-{os.getpid()}.fifo")
    os.mkfifo(fifo)  # opening it for reading blocks: a disk that does not answer
    files = [(str(tmp_path / f"{i}.bin"), make_file(tmp_path / f"{i}.bin", 3 * MIB, i))
             for i in range(3)]
    mr = rpg.MapReduce(session, [pilot], str(tmp_path / "cache"), min_chunk=64 * KIB,
                       read_timeout=1.5, retries=1)
    try:
        stalled = mr.submit("hist", fifo)
        time.sleep(0.3)
        t = time.monotonic()
        for path, data in files:  # cold: their chunks run on the workers the stall left free
            assert np.array_equal(mr.submit("hist", path).result(30), hist(data))
        took = time.monotonic() - t
        assert stalled.state == rpg.mapreduce.RUNNING, "the stalled job ended too soon"
        with pytest.raises(rpg.MapReduceError, match="I/O timeout") as ei:
            stalled.result(30)
        print(f"\nstalled disk: 3 healthy jobs in {took:.2f} s; the stalled one: {ei.value}")
    finally:
        mr.close()
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # free the stuck threads
        except OSError:
            pass
        os.unlink(fifo)


def test_bad_input_is_refused_naming_it(mr, tmp_path):
    make_file(tmp_path / "a.bin", 100 * KIB)
    path = str(tmp_path / "a.bin")
    with pytest.raises(ValueError, match="kind 'nope'"):
        mr.submit("nope", path)
    with pytest.raises(ValueError, match="takes 2 file"):
        mr.submit("diff", path)
    with pytest.raises(ValueError, match="start must be"):
        mr.submit("hist", path, -1)
    with pytest.raises(ValueError, match=r"end \(5\) must be above start \(5\)"):
        mr.submit("hist", path, 5, 5)
    with pytest.raises(ValueError, match="name must be"):
        mr.register("Bad Name", len, max)
    with pytest.raises(ValueError, match="prefix 'HIST'"):
        mr.register("mine", len, max, prefix="HIST")
    with pytest.raises(ValueError, match="min_chunk must be a power of two"):
        rpg.MapReduce(mr._session, [], str(tmp_path / "c2"), min_chunk=1000)
    with pytest.raises(ValueError, match="pilots"):
        rpg.MapReduce(mr._session, [], str(tmp_path / "c2"))
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    with pytest.raises(PermissionError, match="not writable by others"):
        rpg.MapReduce(mr._session, [object()], str(open_dir))
    for args, words in (((path, 0, 200 * KIB), "past the end of the file"),
                        ((str(tmp_path / "missing"),), "FileNotFoundError"),
                        ((str(tmp_path),), "not a regular file")):
        with pytest.raises(rpg.MapReduceError, match=words):
            mr.submit("hist", *args).result(30)
    assert mr.jobs() == []


def test_cache_limit_evicts_least_recently_used(session, pilot, tmp_path):
    make_file(tmp_path / "a.bin", 2 * MIB)
    limit = 40 * KIB  # about 20 chunk files of 2 KiB
    mr = rpg.MapReduce(session, [pilot], str(tmp_path / "cache"), min_chunk=64 * KIB,
                       cache_limit=limit)
    try:
        for a in range(0, 2 * MIB, 256 * KIB):
            mr.submit("hist", str(tmp_path / "a.bin"), a, a + 256 * KIB).result(30)
        on_disk = sum(e.stat().st_size for e in os.scandir(tmp_path / "cache"))
        assert mr.cache.evicted > 0 and on_disk <= limit
        assert on_disk == mr.cache.bytes
    finally:
        mr.close()


def test_mapreduce_from_a_remote_client_of_the_hub_service(hub_service, tmp_path):
    data = make_file(tmp_path / "a.bin", 3 * MIB)
    with rpg.Session(hub=hub_service.access_path) as s:
        pilot = rpg.PilotManager(s).submit_pilots(rpg.PilotDescription(cores=2, runtime=5))
        mr = rpg.MapReduce(s, [pilot], str(tmp_path / "cache"), min_chunk=64 * KIB)
        try:
            job = mr.submit("hist", str(tmp_path / "a.bin"))
            answers = list(job.answers(timeout=60))
            assert job.answered >= 2 and np.array_equal(answers[-1].value, hist(data))
            mr.register("slow", slow_hist, add, zero=np.zeros(256, np.int64))
            job = mr.submit("slow", str(tmp_path / "a.bin"))
            next(job.answers(timeout=60))
            assert mr.cancel(job.id) and job.state == rpg.mapreduce.CANCELED
        finally:
            mr.close()


def test_rpg_hist_command(tmp_path):
    data = make_file(tmp_path / "a.bin", 3 * MIB + 7)
    cmd = [sys.executable, "-m", "rpg.cli", "hist", str(tmp_path / "a.bin"), "--cache-dir",
           str(tmp_path / "cache"), "--start", "10"]
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["value"] == hist(data[10:]).tolist() and got["answers"] >= 2
    assert "rpg hist: % covered 100/100" in out.stderr, out.stderr
    text = subprocess.run(cmd + ["--kind", "entropy"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert text.returncode == 0 and "from cache" in text.stderr
    assert f"{entropy(data[10:]):.6f} bits per byte" in text.stdout
    bad = subprocess.run(cmd + ["--kind", "diff"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "takes 2 file(s)" in bad.stderr
    assert os.listdir(tmp_path) == ["a.bin", "cache"] or \
        sorted(os.listdir(tmp_path)) == ["a.bin", "cache"]
