"""Shared fixtures: every test is checked for leaked child processes, threads and sockets."""

from __future__ import annotations

import os
import time

import numpy  # noqa: F401  (its OpenBLAS threads start at import: before any test's count)
import psutil
import pytest


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                names.append(f"{tid}:{fh.read().strip()}")
        except OSError:
            pass
    return names


def _sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {p.status()} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return out


@pytest.fixture(autouse=True)
def no_leaks(request):
    """After each test: no child process (zombie or not), no extra thread, no extra socket."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    threads0, sockets0 = _threads(), _sockets()
    pids0 = {p.pid for p in _children()}
    yield
    deadline = time.monotonic() + 5.0
    while True:
        kids = [p for p in _children() if p.pid not in pids0]
        threads, sockets = _threads(), _sockets()
        if not kids and threads <= threads0 and sockets <= sockets0:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    problems = []
    if kids:
        problems.append(f"child processes left: {_describe(kids)}")
    if threads > threads0:
        problems.append(f"threads: {threads0} before, {threads} after: {_thread_names()}")
    if sockets > sockets0:
        problems.append(f"sockets: {sockets0} before, {sockets} after")
    if threads > threads0:
        import faulthandler
        import sys

        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    pytest.fail("leak after test: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def session(tmp_path):
    """A session with its sandbox in the test's tmp_path, closed after the test."""
    import rpg

    with rpg.Session(sandbox=str(tmp_path / "session")) as s:
        yield s


@pytest.fixture
def hub_service(tmp_path):
    """A real ``rpg hub serve`` in tmp_path/hub; SIGTERMed after the test (exit code 0)."""
    from tests.hub_fixture import HubProcess

    hub = HubProcess(str(tmp_path / "hub"))
    try:
        yield hub
    finally:
        rc = hub.stop()
        assert rc == 0, f"rpg hub serve exited {rc}: {hub.log().decode()[-2000:]}"


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_leaks: skip the leak check (explain why in the test)")
