"""IOPool: the lanes of one gevent loop, chosen by purpose and by disk.

``pool.for_path(path)`` gives the lane of the device that holds ``path``, found from the mount
table by longest prefix (a pure string match: resolving a lane never touches the disk it is
for, so a dying disk cannot stall the lookup). Process spawning and network staging have lanes
of their own. Applications and tests may pin a path prefix to a named lane with ``assign``.
"""

from __future__ import annotations

import os
from typing import Any

import gevent

from rpg.io_pool.lane import Lane

SPAWN = "spawn"
NET = "net"
DIR_CACHE = 4096  # directories whose lane is remembered (cleared when full, or on assign)


def _unescape_mount(path: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    return (path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def read_mounts() -> list[tuple[str, str]]:
    """(mount point, device "major:minor") pairs from /proc/self/mountinfo, longest first."""
    mounts: list[tuple[str, str]] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 5:
                    mounts.append((_unescape_mount(parts[4]), parts[2]))
    except OSError:
        mounts = [("/", "0:0")]
    mounts.sort(key=lambda m: len(m[0]), reverse=True)
    return mounts


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


class IOPool:
    """The lanes of one loop. Create it in the thread whose gevent loop will call the lanes."""

    def __init__(
        self,
        hub: Any = None,
        disk_threads: int = 4,
        spawn_threads: int = 4,
        net_threads: int = 8,
        queue_limit: int = 100_000,
        stall_after: float = 5.0,
        fail_fast: bool = False,
    ) -> None:
        self.hub = hub if hub is not None else gevent.get_hub()
        self.disk_threads = disk_threads
        self.queue_limit = queue_limit
        self.stall_after = stall_after
        self.fail_fast = fail_fast
        self._lanes: dict[str, Lane] = {}
        self._assigned: list[tuple[str, str]] = []  # (prefix, lane name), longest first
        # procfs is memory, not disk: reading it here cannot stall on a dying device.
        self._mounts = read_mounts()
        # A path that is no mount point nor assigned prefix has its directory's lane: the
        # agent asks for each unit sandbox's lane twice, and the scan of a mount table (tens
        # of entries in a container, hundreds on an HPC node) was a third of the Python calls
        # its loop made for a unit.
        self._points = {m for m, _ in self._mounts}
        self._by_dir: dict[str, str] = {}
        self.lane(SPAWN, threads=spawn_threads)
        self.lane(NET, threads=net_threads)

    def lane(self, name: str, threads: int | None = None, **kw: Any) -> Lane:
        """The lane called ``name``, created on first use."""
        lane = self._lanes.get(name)
        if lane is None:
            lane = Lane(
                name,
                threads=threads or self.disk_threads,
                queue_limit=kw.pop("queue_limit", self.queue_limit),
                stall_after=kw.pop("stall_after", self.stall_after),
                fail_fast=kw.pop("fail_fast", self.fail_fast),
                hub=self.hub,
                **kw,
            )
            self._lanes[name] = lane
        return lane

    @property
    def spawn(self) -> Lane:
        return self._lanes[SPAWN]

    @property
    def net(self) -> Lane:
        return self._lanes[NET]

    def assign(self, prefix: str, lane_name: str) -> None:
        """Route every path under ``prefix`` to the lane ``lane_name`` (e.g. one simulated disk)."""
        prefix = os.path.abspath(prefix)
        self._assigned = [a for a in self._assigned if a[0] != prefix]
        self._assigned.append((prefix, lane_name))
        self._assigned.sort(key=lambda a: len(a[0]), reverse=True)
        self._points.add(prefix)
        self._by_dir.clear()

    def device_of(self, path: str) -> str:
        """The device id ("major:minor") of the mount that holds ``path`` (no disk access)."""
        path = os.path.abspath(path)
        for mount, dev in self._mounts:
            if _under(path, mount):
                return dev
        return "0:0"

    def lane_name_for(self, path: str) -> str:
        path = os.path.abspath(path)
        if path in self._points:  # a mount point's lane is not its directory's
            return self._scan(path)
        parent = path.rpartition("/")[0]
        name = self._by_dir.get(parent)
        if name is None:
            if len(self._by_dir) >= DIR_CACHE:
                self._by_dir.clear()
            name = self._by_dir[parent] = self._scan(path)
        return name

    def _scan(self, path: str) -> str:
        for prefix, name in self._assigned:
            if _under(path, prefix):
                return name
        return "disk:" + self.device_of(path)

    def for_path(self, path: str) -> Lane:
        """The lane for disk I/O on ``path``: one lane per device, so stalls stay on their disk."""
        return self.lane(self.lane_name_for(path))

    def lanes(self) -> dict[str, Lane]:
        return dict(self._lanes)

    def health(self) -> dict[str, dict[str, Any]]:
        return {name: lane.health() for name, lane in self._lanes.items()}

    def close(self, wait: float = 2.0) -> int:
        """Close every lane; returns the number of threads left stuck in blocking calls."""
        return sum(lane.close(wait=wait) for lane in list(self._lanes.values()))
