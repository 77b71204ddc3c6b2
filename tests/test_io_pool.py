"""rpg.io_pool: lanes, isolation of a stalled lane, the loop watch, and process spawn/reap.

Real threads, real blocking calls (unpatched sleeps, FIFOs with no writer), real processes.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from time import monotonic, perf_counter

import gevent
import psutil
import pytest

import rpg
from rpg.io_pool import (
    IOPool,
    IOTimeout,
    LaneClosed,
    LaneDegraded,
    LaneFull,
    LoopWatch,
    SpawnError,
    blocking,
    loop_blocked_total,
    spawn,
    yield_to_loop,
)
from rpg.io_pool.loop_watch import lag_window
from tests.pilots import local_pilot

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pool():
    """An IOPool on this thread's loop; every thread must have come back when the test ends."""
    p = IOPool(disk_threads=2, spawn_threads=2, net_threads=2)
    try:
        yield p
    finally:
        stuck = p.close(wait=5.0)
    assert stuck == 0, f"{stuck} io_pool threads still stuck after the test"


def _noop() -> int:
    return 1


def _boom() -> None:
    raise ValueError("boom from a lane thread")


def _wait_for(cond, limit: float = 5.0, what: str = "condition") -> None:
    deadline = monotonic() + limit
    while not cond():
        if monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        gevent.sleep(0.01)


def _read_fifo(path: str) -> bytes:
    """A real blocking read: open() of a FIFO blocks in the kernel until a writer opens it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 16)
    finally:
        os.close(fd)


def _release_fifo(path: str, limit: float = 5.0) -> None:
    """Open the FIFO for writing (non-blocking: succeeds once its reader is in open) and write."""
    deadline = monotonic() + limit
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or monotonic() > deadline:
                raise
            gevent.sleep(0.01)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


class Ticker:
    """A greenlet that sleeps 10 ms at a time and records the largest gap between its wakeups."""

    def __init__(self, tick: float = 0.01) -> None:
        self.tick = tick
        self.max_gap = 0.0
        self.ticks = 0
        self._g = gevent.spawn(self._run)

    def _run(self) -> None:
        last = perf_counter()
        while True:
            gevent.sleep(self.tick)
            now = perf_counter()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    def stop(self) -> None:
        self._g.kill()


# -- lanes ----------------------------------------------------------------------------------------


def test_lane_returns_results_and_propagates_exceptions(pool):
    lane = pool.lane("disk:test", threads=2)
    assert lane.run(_noop) == 1
    assert lane.run(lambda a, b=0: a + b, 2, b=3) == 5
    main_thread = threading.get_ident()
    assert lane.run(threading.get_ident) != main_thread  # ran on a real lane thread
    with pytest.raises(ValueError, match="boom from a lane thread"):
        lane.run(_boom)
    h = lane.health()
    assert h["completed"] == 4 and h["errors"] == 1 and h["running"] == 0 and h["queued"] == 0


def test_lane_timeout_raises_iotimeout(pool):
    lane = pool.lane("disk:slow", threads=1)
    t0 = perf_counter()
    with pytest.raises(IOTimeout) as info:
        lane.run(blocking.sleep, 0.6, timeout=0.05)
    assert perf_counter() - t0 < 0.5  # the caller got control back; the thread is still busy
    assert isinstance(info.value, TimeoutError)
    assert info.value.lane == "disk:slow" and info.value.timeout == 0.05
    assert "disk:slow" in str(info.value)
    assert lane.health()["timeouts"] == 1
    assert lane.health()["running"] == 1
    _wait_for(lambda: lane.health()["running"] == 0, what="the timed-out call to finish")


def test_bounded_queue_rejects_with_lane_full(pool):
    lane = pool.lane("disk:small", threads=1, queue_limit=1)
    gate = threading.Event()
    running = gevent.spawn(lane.run, gate.wait, 10)
    queued = gevent.spawn(lane.run, gate.wait, 10)
    try:
        _wait_for(lambda: lane.health()["running"] == 1 and lane.health()["queued"] == 1,
                  what="one running and one queued call")
        with pytest.raises(LaneFull, match=r"lane 'disk:small' is full: 2 calls outstanding"):
            lane.run(_noop)
        assert lane.health()["rejected"] == 1
    finally:
        gate.set()
        assert running.get(timeout=5) is True and queued.get(timeout=5) is True
    assert lane.run(_noop) == 1  # room again


def test_stuck_threads_counted_degraded_and_fail_fast(pool):
    dying = pool.lane("disk:dying", threads=2, stall_after=0.1, fail_fast=True)
    patient = pool.lane("disk:patient", threads=2, stall_after=0.1, fail_fast=False)
    gate = threading.Event()
    held = [gevent.spawn(dying.run, gate.wait, 10), gevent.spawn(patient.run, gate.wait, 10)]
    try:
        _wait_for(lambda: dying.health()["stuck"] == 1 and patient.health()["stuck"] == 1,
                  what="both lanes to count a stuck thread")
        h = dying.health()
        assert h["degraded"] is True and h["running"] == 1
        with pytest.raises(LaneDegraded, match="disk:dying"):
            dying.run(_noop)
        assert dying.health()["rejected"] == 1
        # Without fail_fast a degraded lane still takes work on its free thread.
        assert patient.health()["degraded"] is True
        assert patient.run(_noop) == 1
    finally:
        gate.set()
        for g in held:
            assert g.get(timeout=5) is True
    assert dying.health()["stuck"] == 0 and dying.health()["degraded"] is False
    assert dying.run(_noop) == 1


def test_killed_caller_abandons_or_keeps_the_result(pool):
    """Killed mid-call: by default the caller leaves at once and the result is dropped; with
    keep= it waits for the result (a process that was started, say) and hands it over."""
    lane = pool.lane("keep")
    blocking_sleep = __import__("rpg.io_pool.blocking", fromlist=["sleep"]).sleep
    kept: list[str] = []

    def slow() -> str:
        blocking_sleep(0.3)
        return "started"

    g1 = gevent.spawn(lane.run, slow, timeout=5)
    g2 = gevent.spawn(lane.run, slow, timeout=5, keep=kept.append)
    gevent.sleep(0.05)
    t0 = monotonic()
    g1.kill(block=True)
    assert monotonic() - t0 < 0.1 and kept == []  # abandoned at once
    g2.kill(block=True)
    assert kept == ["started"]  # waited for, then handed over
    assert g1.dead and g2.dead


def test_closed_lane_refuses_calls(pool):
    lane = pool.lane("disk:closing", threads=1)
    assert lane.run(_noop) == 1
    assert lane.close(wait=2.0) == 0
    with pytest.raises(LaneClosed):
        lane.run(_noop)


def test_closing_a_lane_wakes_the_caller_of_a_stuck_call_and_the_thread_leaves_later(pool):
    """The caller of a call whose thread is stuck, with no timeout of its own, hears
    LaneClosed when the lane closes (nothing else would wake it); the thread exits once its
    call returns."""
    lane = pool.lane("disk:stuck", threads=1)
    gate = threading.Event()
    caller = gevent.spawn(lane.run, gate.wait, 10)
    _wait_for(lambda: lane.health()["running"] == 1, what="the call to start")
    assert lane.close(wait=0.1) == 1  # one thread still stuck
    with pytest.raises(LaneClosed, match="closed while the call was still running"):
        caller.get(timeout=2)
    gate.set()
    _wait_for(lambda: lane.health()["running"] == 0, what="the stuck call to return")


def test_an_outcome_that_came_just_before_close_still_reaches_its_caller(pool):
    """The thread finished and woke the loop, but the loop had not run yet when close came."""
    lane = pool.lane("disk:late", threads=1)
    gate = threading.Event()
    caller = gevent.spawn(lane.run, lambda: gate.wait(10) and "finished")
    _wait_for(lambda: lane.health()["running"] == 1, what="the call to start")
    gate.set()
    blocking.sleep(0.1)  # the loop blocked: the thread leaves its outcome, nobody takes it yet
    assert lane.close(wait=0) == 0
    assert caller.get(timeout=2) == "finished"


def test_a_lane_called_from_another_thread_says_so(pool):
    lane = pool.lane("disk:mine", threads=1)
    got: list[BaseException] = []

    def other() -> None:
        try:
            lane.run(_noop)
        except BaseException as exc:
            got.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=10)
    assert len(got) == 1 and "belongs to the loop of another thread" in str(got[0])
    assert lane.run(_noop) == 1


def test_a_thread_error_of_any_kind_reaches_the_caller(pool):
    lane = pool.lane("disk:exit", threads=1)

    def leave() -> None:
        raise SystemExit(7)

    with pytest.raises(SystemExit) as info:
        lane.run(leave)
    assert info.value.code == 7
    assert lane.run(_noop) == 1  # the thread lived on
    assert lane.health()["errors"] == 1


def test_an_idle_lane_lets_its_loop_finish_and_a_busy_one_keeps_it():
    """On a loop of its own (a thread's): after its calls, a lane holds no watcher that keeps
    the loop running (the embedded hub's thread joins its loop before it ends)."""
    from rpg import threads as rpg_threads
    from rpg.io_pool import Lane

    out: dict[str, object] = {}

    def body() -> None:
        hub = gevent.get_hub()
        lane = Lane("own", threads=2, hub=hub)
        try:
            assert lane.run(_noop) == 1
            out["idle_joined"] = hub.join(timeout=2.0)
            gate = threading.Event()
            gevent.spawn(lane.run, gate.wait, 5)
            gevent.sleep(0.05)
            t0 = monotonic()
            gevent.spawn_later(0.3, gate.set)
            out["busy_joined"] = hub.join(timeout=3.0)
            out["busy_join_s"] = monotonic() - t0
        finally:
            out["stuck"] = lane.close(wait=2.0)
            # This frame outlives the thread (its destroyed hub's greenlet keeps it): let go of
            # the lane, which a later test counts among the objects left behind.
            del lane
            hub.destroy(destroy_loop=True)

    t = rpg_threads.Thread(body, name="lane-loop-test")
    t.start()
    assert t.join(timeout=20)
    assert out["idle_joined"] is True
    # The loop ran on while a call was out, and finished once it came back.
    assert out["busy_joined"] is True and out["busy_join_s"] >= 0.25, out
    assert out["stuck"] == 0


def test_stalled_fifo_lane_does_not_hold_other_lanes_or_the_loop(pool, tmp_path):
    fifo = str(tmp_path / "dying-disk")
    os.mkfifo(fifo)
    watch = LoopWatch("test-fifo").start()
    blocked0 = loop_blocked_total()
    ticker = Ticker()
    stalled = pool.lane("disk:dying", threads=1)
    healthy = pool.lane("disk:healthy", threads=2)
    reader = gevent.spawn(stalled.run, _read_fifo, fifo)
    try:
        _wait_for(lambda: stalled.health()["running"] == 1, what="the FIFO read to start")
        gevent.sleep(0.1)
        assert not reader.ready()  # really stuck in open()

        done = []

        def worker() -> None:
            for _ in range(25):
                done.append(healthy.run(blocking.sleep, 0.002))

        t0 = perf_counter()
        gevent.joinall([gevent.spawn(worker) for _ in range(8)], timeout=20, raise_error=True)
        took = perf_counter() - t0
        assert len(done) == 200  # every op on the healthy lane completed
        assert took < 10.0
        gevent.sleep(0.3)  # give the monitor thread a few periods to notice a block, if any
        assert not reader.ready()  # the dying disk is still stalled
        assert stalled.health()["running"] == 1
        assert watch.blocked_events == 0
        assert loop_blocked_total() == blocked0
        assert ticker.max_gap < 0.1, f"loop gap {ticker.max_gap * 1000:.0f} ms"
    finally:
        _release_fifo(fifo)  # unstick the lane thread so it can exit
        assert reader.get(timeout=5) == b"x"
        ticker.stop()
        watch.stop()


def test_ticker_never_sees_a_gap_over_100ms_while_lanes_block(pool):
    ticker = Ticker()
    try:
        sleepers = [gevent.spawn(pool.lane("disk:a", threads=2).run, blocking.sleep, 0.8),
                    gevent.spawn(pool.lane("disk:b", threads=2).run, blocking.sleep, 0.8)]
        busy = pool.lane("disk:c", threads=2)
        deadline = perf_counter() + 1.0
        n = 0
        while perf_counter() < deadline:
            busy.run(blocking.sleep, 0.001)
            n += 1
        gevent.joinall(sleepers, timeout=5, raise_error=True)
        assert n > 50
        assert ticker.ticks > 50
        assert ticker.max_gap < 0.1, f"loop gap {ticker.max_gap * 1000:.0f} ms"
    finally:
        ticker.stop()


def test_for_path_gives_a_lane_per_device(pool):
    assert pool.device_of("/proc/self/status") != pool.device_of("/tmp/x")
    proc_lane = pool.for_path("/proc/self/status")
    tmp_lane = pool.for_path("/tmp/some/file")
    assert proc_lane is not tmp_lane
    assert proc_lane.name.startswith("disk:") and tmp_lane.name.startswith("disk:")
    assert pool.for_path("/tmp/other") is tmp_lane  # same device, same lane
    assert pool.for_path("/proc/1/stat") is proc_lane

    pool.assign("/srv/node/sdb", "disk:sdb")
    pool.assign("/srv/node/sdc", "disk:sdc")
    sdb = pool.for_path("/srv/node/sdb/objects/1")
    assert sdb.name == "disk:sdb"
    assert pool.for_path("/srv/node/sdb/objects/2") is sdb
    assert pool.for_path("/srv/node/sdc/objects/1").name == "disk:sdc"
    assert pool.for_path("/srv/node/sdbx/objects/1").name != "disk:sdb"  # prefix, not substring
    assert pool.for_path("/srv/node/sdb/../sdc/x").name == "disk:sdc"


def test_for_path_remembers_directories_but_not_across_mount_points_or_assign(pool):
    """A directory's lane is remembered for the paths in it; a mount point (or an assigned
    prefix) is never answered from its parent's entry, and ``assign`` forgets what it knew."""
    root = pool.for_path("/rpg-no-such-dir-a")
    proc = pool.for_path("/proc")  # a mount point, in the same directory ("/") as the above
    assert proc is not root
    assert pool.for_path("/rpg-no-such-dir-b") is root  # "/" still gives the root's lane
    assert pool.for_path("/proc/self") is proc and pool.for_path("/proc") is proc

    before = pool.for_path("/srv/node/sdd/objects/1")
    assert before.name != "disk:sdd"
    pool.assign("/srv/node/sdd", "disk:sdd")
    assert pool.for_path("/srv/node/sdd/objects/1").name == "disk:sdd"  # not the old entry
    assert pool.for_path("/srv/node/sdd").name == "disk:sdd"  # the prefix itself
    assert pool.for_path("/srv/node/sdde") is before  # its sibling, from /srv/node's entry
    assert pool.for_path("/srv/node/sdd/../x") is before


# -- the loop watch -------------------------------------------------------------------------------


def _slice_ns(tid: int | str = "self") -> int:
    path = "/proc/thread-self/sched" if tid == "self" else f"/proc/{tid}/sched"
    with open(path) as fh:
        return next(int(line.split(":")[1]) for line in fh if line.startswith("se.slice"))


def test_a_loop_thread_gets_short_slices_and_what_it_starts_keeps_the_default():
    """LoopWatch asks the kernel for 0.3 ms slices for its loop's thread; the lane threads it
    starts, and the processes they start (spawners, units), keep the default slice."""
    from rpg import threads as rpg_threads
    from rpg.io_pool import Lane
    from rpg.io_pool.loop_watch import LOOP_SLICE_S

    probe = subprocess.Popen(["sleep", "5"])  # the kernel's default, whatever this thread has
    try:
        default = _slice_ns(probe.pid)
    finally:
        probe.kill()
        probe.wait()
    out: dict[str, object] = {}

    def body() -> None:
        hub = gevent.get_hub()
        watch = LoopWatch("slice").start()
        lane = Lane("slice", threads=1, hub=hub)
        try:
            out["granted"] = watch.slice_s
            out["stats"] = watch.stats()["slice_ms"]
            out["loop"] = _slice_ns()
            out["lane"] = lane.run(_slice_ns)
            child = subprocess.Popen(["sleep", "5"])
            try:
                out["child"] = _slice_ns(child.pid)
            finally:
                child.kill()
                child.wait()
        finally:
            lane.close(wait=2.0)
            watch.stop()
            del lane, watch
            hub.destroy(destroy_loop=True)

    t = rpg_threads.Thread(body, name="slice-test")
    t.start()
    assert t.join(timeout=20)
    if out.get("granted") is None:
        pytest.skip("this kernel takes no slice requests (EEVDF custom slices: Linux 6.12+)")
    assert out["granted"] == pytest.approx(LOOP_SLICE_S) and out["stats"] == 0.3
    assert out["loop"] == int(LOOP_SLICE_S * 1e9)
    assert out["lane"] == default and out["child"] == default, (default, out)


NICED_LOOP = """
import errno, json, sys, time
import structlog
from rpg.agent.spawn_server import NICE_RETRY_S, NICE_TRIES, set_autogroup_nice
from rpg.io_pool import LoopWatch
for tries in range(1, NICE_TRIES + 1):  # the kernel's rate limit, as the spawner meets it
    try:
        set_autogroup_nice(int(sys.argv[1]))
        break
    except OSError as exc:
        if exc.errno != errno.EAGAIN or tries == NICE_TRIES:
            raise
        time.sleep(NICE_RETRY_S)
with structlog.testing.capture_logs() as logs:
    watch = LoopWatch("niced").start()
    stats = watch.stats()
    watch.stop()
print(json.dumps({"stats": stats, "events": [e["event"] for e in logs]}))
"""


def _niced_loop(nice: int) -> dict:
    if not os.path.exists("/proc/self/autogroup"):
        pytest.skip("no autogroup scheduling in this kernel")
    out = subprocess.run([sys.executable, "-c", NICED_LOOP, str(nice)], capture_output=True,
                         text=True, timeout=60, start_new_session=True)  # a session of its own
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_loop_started_in_a_niced_session_says_so():
    """An application started from a niced shell (or session) runs its embedded hub's loop at
    that priority, behind its pilot's units: the watch says so once, and its stats carry the
    thread's nice and the session's autogroup nice. At nice 0 it says nothing."""
    niced = _niced_loop(19)
    assert niced["stats"]["autogroup_nice"] == 19 and niced["stats"]["nice"] == 0, niced
    assert niced["events"].count("loop_niced") == 1, niced
    plain = _niced_loop(0)
    assert plain["stats"]["autogroup_nice"] == 0 and plain["stats"]["nice"] == 0, plain
    assert "loop_niced" not in plain["events"], plain


def test_loop_watch_counts_a_real_block():
    watch = LoopWatch("test-positive").start()
    try:
        before = loop_blocked_total()
        gevent.sleep(0.15)
        blocking.sleep(0.5)  # block this loop for real: the positive control
        gevent.sleep(0.3)
        assert watch.blocked_events >= 1
        assert loop_blocked_total() - before >= 1
        assert watch.stats()["lag_max_ms"] >= 400
    finally:
        watch.stop()


def test_loop_watch_rests_while_its_loop_holds_no_work_and_wakes_when_work_comes():
    """With ``busy``, the ticker ticks every ``idle_tick`` while it says no (a tick is a wake-up
    of the loop's thread), every ``tick`` once it says yes; ``wake`` ends a rest at once. A
    rest's timer still measures lag: a block during it is seen."""
    held: list[int] = []
    watch = LoopWatch("test-rest", busy=lambda: bool(held), idle_tick=0.1).start()
    try:
        gevent.sleep(0.55)
        idle = watch.stats()
        assert 3 <= idle["rests"] <= 6 and idle["ticks"] == idle["rests"], idle
        held.append(1)
        t_woke = perf_counter()
        watch.wake()
        gevent.sleep(0.2)
        busy = watch.stats()
        assert busy["rests"] == idle["rests"], busy  # woken: no rest ran out meanwhile
        assert busy["ticks"] - idle["ticks"] >= 8, busy  # every 10 ms from the wake on
        first = watch.ticks()[idle["ticks"], 0]
        assert first - t_woke < 0.05, first - t_woke  # not after what was left of the rest
        held.clear()
        gevent.sleep(0.15)  # the ticker goes back to resting
        blocking.sleep(0.25)  # inside a rest
        gevent.sleep(0.15)
        after = watch.stats()
        assert after["rests"] > busy["rests"] and after["lag_max_ms"] >= 100, after
    finally:
        watch.stop()


def test_a_busy_test_that_raises_leaves_the_ticker_ticking_as_if_busy():
    calls = []

    def broken() -> bool:
        calls.append(1)
        raise RuntimeError("no ledger")

    watch = LoopWatch("test-broken-busy", busy=broken, idle_tick=0.1).start()
    try:
        gevent.sleep(0.3)
        stats = watch.stats()
        assert len(calls) == 1 and watch.busy is None  # asked once, then never again
        assert stats["ticks"] >= 10 and stats["rests"] == 0, stats
    finally:
        watch.stop()


def test_an_idle_sessions_loops_rest_and_a_submit_wakes_them(session):
    """The embedded hub's ticker and its agent's rest while they hold no unit, and tick every
    10 ms while units run (their lag is measured where there is work)."""
    _, pilot, umgr = local_pilot(session, cores=2)
    assert pilot.wait(state="ACTIVE", timeout=30) == "ACTIVE", pilot.reason
    before = session.hub.stats()["loop"]
    threading.Event().wait(0.6)
    idle = session.hub.stats()["loop"]
    assert idle["ticks"] - before["ticks"] <= 12, (before, idle)  # 60 at 10 ms
    assert idle["rests"] > before["rests"], idle
    units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["0.5"])
                               for _ in range(2)])
    assert umgr.wait_units(timeout=30) == ["DONE"] * 2, [u.reason for u in units]
    busy = session.hub.stats()["loop"]
    assert busy["ticks"] - idle["ticks"] >= 30, (idle, busy)  # 0.5 s at 10 ms: 50
    pilot.cancel()
    assert pilot.wait(timeout=30) == "CANCELED"
    with open(os.path.join(session.sandbox, pilot.uid, "agent.stats.json")) as fh:
        loop = json.load(fh)["loop"]
    assert loop["rests"] >= 1 and loop["ticks"] - loop["rests"] >= 30, loop


def test_loop_watch_ticks_carry_their_times_so_a_window_finds_a_block():
    watch = LoopWatch("test-window").start()
    try:
        gevent.sleep(0.2)
        t_block = perf_counter()
        blocking.sleep(0.08)  # the one late tick wakes after this
        gevent.sleep(0.2)
        t_end = perf_counter()
        ticks = watch.ticks()
        assert ticks.shape[1] == 2 and (ticks[1:, 0] > ticks[:-1, 0]).all()  # oldest first
        late = ticks[ticks[:, 1] >= 0.06]
        assert len(late) == 1 and t_block + 0.08 <= late[0, 0] <= t_end, late
        around = lag_window(ticks, t_block, t_block + 0.1)
        assert around["ticks"] >= 1 and around["lag_max_ms"] >= 60
        before = lag_window(ticks, 0.0, t_block)
        assert before["ticks"] >= 5 and before["lag_max_ms"] < 60
        assert lag_window(ticks, t_end + 1, t_end + 2)["ticks"] == 0
    finally:
        watch.stop()


def _slices_and_a_due_timer(pause) -> list[str]:
    """A greenlet does two slices of work with ``pause`` between them; the first slice wakes a
    waiting greenlet, and a timer falls due while it runs. The order things happened in."""
    order: list[str] = []
    woken = gevent.event.Event()

    def waiter() -> None:
        woken.wait()
        order.append("woken")

    def timer() -> None:
        gevent.sleep(0.001)
        order.append("timer")

    def worker() -> None:
        woken.set()
        end = perf_counter() + 0.02  # the timer is due long before the slice ends
        while perf_counter() < end:
            pass
        order.append("slice 1")
        pause()
        order.append("slice 2")

    gs = [gevent.spawn(waiter), gevent.spawn(timer)]
    gevent.sleep(0)  # both wait now
    gs.append(gevent.spawn(worker))
    gevent.joinall(gs, timeout=5, raise_error=True)
    return order


def test_yield_to_loop_lets_due_timers_and_what_the_slice_woke_run_before_the_next_slice():
    """The reason for yield_to_loop: with sleep(0) between slices, a timer that fell due waits
    for the next slice (gevent runs the callbacks queued meanwhile in the same pass); the loop's
    lag is then the sum of the slices."""
    assert _slices_and_a_due_timer(gevent.sleep) == ["slice 1", "woken", "slice 2", "timer"]
    assert _slices_and_a_due_timer(yield_to_loop) == ["slice 1", "woken", "timer", "slice 2"]


# -- processes ------------------------------------------------------------------------------------


def _our_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_spawn_wait_reaps_through_pidfd(pool, tmp_path):
    out = tmp_path / "out.txt"
    child = pool.spawn.run(spawn, ["sh", "-c", "echo hello; exit 7"], stdout_path=str(out))
    assert child.pgid == child.pid == os.getpgid(child.pid)  # leads its own process group
    assert child.pidfd >= 0
    rc = child.wait(timeout=10)
    assert rc == 7 and child.returncode == 7
    assert child.pidfd == -1  # closed once reaped
    assert child.pid not in _our_children()  # reaped: not even a zombie
    assert out.read_text() == "hello\n"
    assert child.wait() == 7  # idempotent


def test_spawn_of_missing_executable_raises(pool):
    with pytest.raises(SpawnError, match="cannot start"):
        pool.spawn.run(spawn, ["/nonexistent/rpg-no-such-program"])


def test_terminate_kills_the_whole_group_including_a_grandchild(pool):
    child = pool.spawn.run(spawn, ["sh", "-c", "sleep 100 & sleep 100"])
    leader = psutil.Process(child.pid)
    _wait_for(lambda: any(p.name() == "sleep" for p in leader.children(recursive=True))
              and (leader.name() == "sleep" or len(leader.children()) >= 2),
              what="both sleeps to start")
    members = [p.pid for p in leader.children(recursive=True)]
    assert all(os.getpgid(pid) == child.pgid for pid in members)
    rc = child.terminate(grace=3.0)
    assert rc == -signal.SIGTERM
    assert child.pid not in _our_children()

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # init reaps it later
        except psutil.NoSuchProcess:
            return True

    _wait_for(lambda: all(gone(pid) for pid in members), what="the grandchild to die")


def test_terminate_sigkills_a_child_that_ignores_sigterm(pool, tmp_path):
    ready = tmp_path / "ready"
    child = pool.spawn.run(spawn, ["sh", "-c", f"trap '' TERM; echo ok > {ready}; sleep 100"])
    _wait_for(lambda: ready.exists() and ready.read_text() == "ok\n", what="the trap")
    t0 = perf_counter()
    rc = child.terminate(grace=0.5)
    took = perf_counter() - t0
    assert rc == -signal.SIGKILL
    assert 0.45 <= took < 5.0
    assert child.pid not in _our_children()


# -- an application that monkey-patches -----------------------------------------------------------

PATCHED_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import json, time
    import gevent
    from rpg.io_pool import IOPool, LoopWatch, blocking, spawn

    out = {"time_sleep_patched": monkey.is_object_patched("time", "sleep"),
           "blocking_sleep_is_original": blocking.sleep is not time.sleep}
    watch = LoopWatch("patched").start()
    pool = IOPool()
    gaps = []

    def ticker():
        last = time.perf_counter()
        while True:
            gevent.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = gevent.spawn(ticker)
    t0 = time.perf_counter()
    pool.lane("disk:x").run(blocking.sleep, 0.5)
    out["lane_sleep_s"] = time.perf_counter() - t0
    child = pool.spawn.run(spawn, ["sh", "-c", "exit 5"])
    out["rc"] = child.wait(timeout=20)
    out["pidfd_closed"] = child.pidfd == -1
    sleeper = pool.spawn.run(spawn, ["sleep", "100"])
    out["terminated_rc"] = sleeper.terminate(grace=2.0)
    gevent.sleep(0.2)
    tick.kill()
    out["ticks"] = len(gaps)
    out["max_gap_ms"] = max(gaps) * 1000.0
    out["blocked_events"] = watch.blocked_events
    out["stuck"] = pool.close(wait=5.0)
    watch.stop()
    print(json.dumps(out))
    """
)


def test_works_under_monkey_patching_in_a_subprocess(tmp_path):
    script = tmp_path / "patched_app.py"
    script.write_text(PATCHED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["time_sleep_patched"] is True
    assert out["blocking_sleep_is_original"] is True
    assert out["lane_sleep_s"] >= 0.49
    assert out["rc"] == 5 and out["pidfd_closed"] is True
    assert out["terminated_rc"] == -signal.SIGTERM
    assert out["ticks"] > 20
    assert out["max_gap_ms"] < 100.0
    assert out["blocked_events"] == 0
    assert out["stuck"] == 0


def test_read_tail_reads_the_end_and_refuses_what_is_not_a_regular_file(tmp_path):
    from rpg.io_pool.tails import read_tail

    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text").write_bytes(b"abc\xffdef")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")  # nobody writes it: reading must not hang
    os.symlink(tmp_path / "text", tmp_path / "link")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    assert read_tail(str(tmp_path / "empty")) == ""
    assert read_tail(str(tmp_path / "missing")) == ""
    assert read_tail(str(tmp_path / "text")) == "abc\ufffddef"
    assert read_tail(str(tmp_path / "text"), limit=3) == "def"
    for name, words in (("dir", "Is a directory"), ("fifo", "not a regular file"),
                        ("link", "symbolic link"), ("dangling", "symbolic link")):
        with pytest.raises(OSError, match=words):
            read_tail(str(tmp_path / name))
