"""Helpers shared by the benchmarks: baselines measured in the same run, and output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from typing import Any


def raw_spawn_rate(n: int = 600, threads: int = 4) -> float:
    """/bin/true spawned with subprocess.run from ``threads`` threads: processes per second."""
    per = n // threads

    def work() -> None:
        for _ in range(per):
            subprocess.run(["/bin/true"], check=True)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return per * threads / (time.perf_counter() - t0)


def raw_sandbox_spawn_rate(root: str, n: int = 600, threads: int = 4,
                           remove: bool = True) -> float:
    """As raw_spawn_rate, each process in a directory of its own with its stdout and stderr in
    files there (what a pilot system's unit gets: rpg, RADICAL-Pilot); the tree is removed
    after unless ``remove`` is False. Processes per second, the removal not counted.

    Keep the tree (``remove=False``) when something that makes files is measured after it on
    the same file system: on ext4 without a journal (this VM's root), a new inode skips every
    free inode that was deleted recently and whose inode-table block is still cached
    (``recently_deleted()`` in ext4's ``find_inode_bit``). 1,800 inodes freed just before made
    each unit sandbox cost several times its CPU here; dropping the page cache clears it."""
    per = n // threads

    def work(k: int) -> None:
        for i in range(per):
            sandbox = os.path.join(root, f"unit.{k}.{i:06d}")
            os.mkdir(sandbox)
            with open(os.path.join(sandbox, "STDOUT"), "wb") as out, \
                    open(os.path.join(sandbox, "STDERR"), "wb") as err:
                subprocess.run(["/bin/true"], cwd=sandbox, stdout=out, stderr=err, check=True)

    os.makedirs(root, exist_ok=True)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rate = per * threads / (time.perf_counter() - t0)
    if remove:
        shutil.rmtree(root)
    return rate


def serial_posix_spawn_us(n: int = 400) -> float:
    """/bin/true started with ``os.posix_spawn`` one at a time, exits reaped as they come
    (as rpg's spawner does, with nothing else running): microseconds of wall time a call."""
    env = dict(os.environ)
    inside, live = 0.0, 0
    for _ in range(n):
        t0 = time.perf_counter()
        os.posix_spawn("/bin/true", ["/bin/true"], env, setpgroup=0)
        inside += time.perf_counter() - t0
        live += 1
        while live:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            live -= 1
    for _ in range(live):
        os.waitpid(-1, 0)
    return inside / n * 1e6


class CPU:
    """CPU seconds (user + system) of this process (or of ``root``, still named "this
    process"), of its children named by ``match`` (a substring of their command line) and of
    theirs, each name's processes summed (an agent with several spawners): ``snap()`` then
    ``since(old)``."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, names: dict[str, str], root: int | None = None) -> None:
        root = os.getpid() if root is None else root
        self.pids: dict[str, list[int]] = {"this process": [root]}
        for pid in _children(root):
            for name, match in names.items():
                if match in _cmdline(pid):
                    self.pids.setdefault(name, []).append(pid)
        for name in list(self.pids):
            if name != "this process":
                kids = [k for pid in self.pids[name] for k in _children(pid)]
                if kids:
                    self.pids[name + "'s children"] = kids

    def snap(self) -> dict[str, tuple[float, float]]:
        out = {}
        for name, pids in self.pids.items():
            own = kids = 0.0
            seen = False
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/stat") as fh:
                        f = fh.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                seen = True
                own += (int(f[11]) + int(f[12])) / self.TICK
                kids += (int(f[13]) + int(f[14])) / self.TICK  # reaped children's
            if seen:
                out[name] = (own, kids)
        return out

    @staticmethod
    def since(old: dict, new: dict) -> dict[str, float]:
        out = {}
        for name, (own, kids) in new.items():
            if name in old:
                out[name] = own - old[name][0]
                if kids - old[name][1] > 0.0005:
                    out[name + " (reaped)"] = kids - old[name][1]
        return out


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")  # a child is listed under the thread that made it
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(x) for x in fh.read().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def emit(name: str, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"bench": name, **result}))
        return
    print(f"== {name}")
    for k, v in result.items():
        print(f"  {k:<34} {v:.3f}" if isinstance(v, float) else f"  {k:<34} {v}")
