"""Function units in warm workers, and rpg.Executor: real agents and worker processes."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest
from pilots import local_pilot
from sshd_fixture import pilot_desc, requires_sshd

import rpg
from rpg import states

# The workers cannot import this test module by name (functions of an importable module travel
# by reference): cloudpickle's documented way to send them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x):
    return x * x


def boom(msg):
    raise ValueError(msg)


def pid_and_sleep(seconds):
    time.sleep(seconds)
    return os.getpid()


def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)


def test_results_exceptions_lambdas_and_closures(session):
    _, _, umgr = local_pilot(session, cores=2)
    k = 7
    units = umgr.submit_units(
        [rpg.UnitDescription(function=square, args=(i,)) for i in range(50)]
        + [rpg.UnitDescription(function=lambda a, b=0: a + b + k, args=(1,), kwargs={"b": 2}),
           rpg.UnitDescription(function=boom, args=("no good",))])
    umgr.wait_units(timeout=60)
    assert [u.result for u in units[:50]] == [i * i for i in range(50)]
    assert units[50].state == states.DONE and units[50].result == 10
    bad = units[51]
    assert bad.state == states.FAILED
    assert isinstance(bad.exception, ValueError) and str(bad.exception) == "no good"
    assert isinstance(bad.exception.__cause__, rpg.RemoteTraceback)
    assert "in boom" in bad.stderr and "ValueError: no good" in bad.reason
    assert bad.result is None


def test_unpicklable_argument_is_refused_at_submit_naming_it(session):
    _, _, umgr = local_pilot(session, cores=1)
    with pytest.raises(rpg.DescriptionError) as ei:
        umgr.submit_units(rpg.UnitDescription(function=square, args=(1, threading.Lock())))
    assert ei.value.field == "args[1]" and "cannot be pickled" in str(ei.value)
    with pytest.raises(rpg.DescriptionError, match="exactly one of"):
        rpg.UnitDescription(function=square, executable="/bin/true")
    with pytest.raises(rpg.DescriptionError, match="cores"):
        rpg.UnitDescription(function=square, args=(1,), cores=2)
    assert umgr.get_units() == []


def test_unpicklable_result_fails_its_unit(session):
    _, _, umgr = local_pilot(session, cores=1)
    u = umgr.submit_units(rpg.UnitDescription(function=threading.Lock))
    umgr.wait_units(timeout=30)
    assert u.state == states.FAILED and "cannot be pickled" in u.reason


def test_numpy_16mb_in_and_out(session):
    _, _, umgr = local_pilot(session, cores=1)
    a = np.arange(2 * 1024 * 1024, dtype=np.float64)  # 16 MiB
    u = umgr.submit_units(rpg.UnitDescription(function=np.multiply, args=(a, 2.0)))
    umgr.wait_units(timeout=60)
    assert u.state == states.DONE, u.reason
    assert u.result.nbytes == a.nbytes and np.array_equal(u.result, a * 2.0)


def test_dead_worker_fails_only_its_unit_and_is_replaced(session):
    _, _, umgr = local_pilot(session, cores=1)
    before = umgr.submit_units(rpg.UnitDescription(function=pid_and_sleep, args=(0,)))
    umgr.wait_units(timeout=30)
    dead = umgr.submit_units([rpg.UnitDescription(function=kill_myself),
                              rpg.UnitDescription(function=os._exit, args=(3,))])
    after = umgr.submit_units(rpg.UnitDescription(function=pid_and_sleep, args=(0,)))
    umgr.wait_units(timeout=60)
    assert dead[0].state == states.FAILED and "signal SIGKILL" in dead[0].reason
    assert dead[1].state == states.FAILED and "exited with code 3" in dead[1].reason
    assert after.state == states.DONE and after.result != before.result  # a new worker
    assert not psutil_alive(before.result)


def psutil_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_timeout_and_cancel_kill_the_worker(session):
    _, _, umgr = local_pilot(session, cores=1)
    slow = umgr.submit_units(rpg.UnitDescription(function=time.sleep, args=(60,), timeout=1))
    umgr.wait_units(timeout=30)
    assert slow.state == states.FAILED and "timed out after 1 s" in slow.reason
    running = umgr.submit_units(rpg.UnitDescription(function=time.sleep, args=(60,)))
    queued = umgr.submit_units(rpg.UnitDescription(function=square, args=(3,)))
    running.wait(states.EXECUTING, timeout=30)
    t0 = time.monotonic()
    umgr.cancel_units([running, queued])
    umgr.wait_units(timeout=30)
    assert running.state == states.CANCELED and queued.state == states.CANCELED
    assert time.monotonic() - t0 < 10
    again = umgr.submit_units(rpg.UnitDescription(function=square, args=(4,)))
    umgr.wait_units(timeout=30)
    assert again.result == 16


def test_memory_hungry_worker_is_recycled(session):
    _, _, umgr = local_pilot(session, cores=1, function_worker_memory=100.0)
    keep = umgr.submit_units(rpg.UnitDescription(
        function=lambda: (globals().setdefault("_hog", bytearray(200 << 20)), os.getpid())[1]))
    umgr.wait_units(timeout=60)
    nxt = umgr.submit_units(rpg.UnitDescription(function=pid_and_sleep, args=(0,)))
    umgr.wait_units(timeout=60)
    assert keep.state == nxt.state == states.DONE
    assert keep.result != nxt.result


def test_executor_submit_map_exceptions_and_cancel():
    with rpg.Executor(cores=2) as ex:
        fs = [ex.submit(square, i) for i in range(2000)]
        assert [f.result(timeout=60) for f in fs] == [i * i for i in range(2000)]
        assert list(ex.map(square, range(1000), chunksize=64)) == [i * i for i in range(1000)]
        f = ex.submit(boom, "bad")
        with pytest.raises(ValueError, match="bad") as ei:
            f.result(timeout=30)
        assert "in boom" in str(ei.value.__cause__)
        with pytest.raises(rpg.calls.CallPackError, match=r"args\[0\]"):
            ex.submit(square, threading.Lock())
        blockers = [ex.submit(time.sleep, 2) for _ in range(20)]
        assert blockers[-1].cancel()  # still queued: withdrawn
        ex.shutdown(wait=True, cancel_futures=True)
        assert blockers[0].done() and any(b.cancelled() for b in blockers)
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_executor_call_after_a_dead_worker_runs_again_once():
    with rpg.Executor(cores=1, max_bundle=64) as ex:
        ex.submit(square, 1).result(timeout=60)  # learn the call time: bundles grow
        fs = [ex.submit(square, i) for i in range(100)] + [ex.submit(kill_myself)] + \
            [ex.submit(square, i) for i in range(100)]
        done, _ = cf.wait(fs, timeout=60)
        assert len(done) == len(fs)
        assert isinstance(fs[100].exception(), rpg.FunctionError)
        assert [f.result() for f in fs[101:]] == [i * i for i in range(100)]


@requires_sshd
def test_executor_on_an_ssh_pilot(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "s")) as s:
        pilot = rpg.PilotManager(s).submit_pilots(pilot_desc(cores=1))
        with rpg.Executor(session=s, pilots=[pilot]) as ex:
            assert list(ex.map(square, range(300), chunksize=16)) == \
                [i * i for i in range(300)]


def test_executor_from_a_remote_client_of_the_hub_service(hub_service):
    with rpg.Session(hub=hub_service.access_path) as s:
        pilot = rpg.PilotManager(s).submit_pilots(rpg.PilotDescription(cores=2, runtime=5))
        with rpg.Executor(session=s, pilots=[pilot]) as ex:
            assert sum(ex.map(square, range(2000), chunksize=50)) == \
                sum(i * i for i in range(2000))
            with pytest.raises(ValueError, match="remote") as ei:
                ex.submit(boom, "remote").result(timeout=60)
            assert isinstance(ei.value.__cause__, rpg.RemoteTraceback)


def my_autogroup_nice(wait_for, seconds=10.0):
    """The nice value of this worker's session (/proc/self/autogroup), once it is ``wait_for``
    or ``seconds`` have gone by: the kernel takes one autogroup change per 100 ms machine-wide,
    so the agent's change can land after the worker's first unit started."""
    deadline = time.monotonic() + seconds
    while True:
        with open("/proc/self/autogroup") as fh:
            value = int(fh.read().split()[-1])
        if value == wait_for or time.monotonic() > deadline:
            return value, os.getsid(0) == os.getpid()
        time.sleep(0.05)


def test_function_workers_run_at_the_pilots_unit_nice_in_sessions_of_their_own(session):
    """A function unit's worker gets the pilot's unit_nice (19 unless said), as executable
    units do; with unit_nice=0 it is left at 0. The agent's session is not touched."""
    _, pilot, umgr = local_pilot(session, cores=2)
    pmgr0 = rpg.PilotManager(session)
    zero = pmgr0.submit_pilots(rpg.PilotDescription(cores=1, unit_nice=0))
    umgr0 = rpg.UnitManager(session)
    umgr0.add_pilots(zero)
    niced = umgr.submit_units([rpg.UnitDescription(function=my_autogroup_nice, args=(19,))
                               for _ in range(2)])
    plain = umgr0.submit_units(rpg.UnitDescription(function=my_autogroup_nice, args=(0, 1.0)))
    assert umgr.wait_units(timeout=60) == ["DONE"] * 2, [u.reason for u in niced]
    assert plain.wait(timeout=60) == "DONE", plain.reason
    assert [u.result for u in niced] == [(19, True)] * 2
    assert plain.result == (0, True)
    for p in (pilot, zero):
        with open(f"/proc/{p.pid}/autogroup") as fh:
            assert int(fh.read().split()[-1]) == 0  # the agent's loop
