"""What the agent's resource gives it: the SLURM allocation, how a unit is launched across it
with ``srun``, and how many open files the agent may hold (its RLIMIT_NOFILE).

``nodes_from_environment`` reads the job's ``SLURM_*`` variables (nodelists like
``node[01-03,05]`` are expanded here, not by calling ``scontrol show hostnames``): no I/O.
``SrunPlacer`` takes the cores of a unit that asks for ``launch="srun"`` from the agent's
scheduler, on several nodes if it needs more than one node has, and wraps its command line in
``srun --nodes=N --ntasks=R --cpus-per-task=C --exact``.
"""

from __future__ import annotations

import itertools
import os
import re
import resource
from collections.abc import Mapping, Sequence
from typing import Any

from gevent.lock import Semaphore


class ResourceError(ValueError):
    """The environment does not describe an allocation, or a unit cannot be laid out on it."""


# -- nodelists -------------------------------------------------------------------------------------

def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` -> ``["a[1,2]", "b"]``."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ResourceError(f"bad nodelist {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ResourceError(f"bad nodelist {text!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, whole: str) -> list[str]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ResourceError(f"bad nodelist {whole!r}: cannot read range {item!r}")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise ResourceError(f"bad nodelist {whole!r}: range {item!r} runs backwards")
        if int(hi) - int(lo) > 1_000_000:
            raise ResourceError(f"bad nodelist {whole!r}: range {item!r} is too large")
        width = len(lo) if lo.startswith("0") else 0  # node[01-03]: keep the zero padding
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(text: str) -> list[str]:
    """``"node[01-03,05],gpu1"`` -> ``["node01", "node02", "node03", "node05", "gpu1"]``.

    Several bracket groups in one name (``rack[1-2]-n[1-2]``) expand as SLURM does, to every
    combination, the last group varying fastest.
    """
    names: list[str] = []
    for part in _split_top(text):
        pieces = re.split(r"(\[[^\]]*\])", part)
        choices = [_expand_range(p[1:-1], text) if p.startswith("[") else [p]
                   for p in pieces if p != ""]
        if any("[" in c or "]" in c for group in choices for c in group):
            raise ResourceError(f"bad nodelist {text!r}: nested brackets")
        names.extend("".join(combo) for combo in itertools.product(*choices))
    return names


def expand_counts(text: str) -> list[int]:
    """SLURM's per-node counts: ``"72(x2),36"`` -> ``[72, 72, 36]``."""
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if not m:
            raise ResourceError(f"bad per-node count list {text!r}: cannot read {item!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _gpu_count(text: str) -> int | None:
    """``"2"``, ``"tesla:2"``, ``"gpu:a100:4"``, ``"a100:2,v100:1"`` -> a count (None if empty)."""
    text = text.strip()
    if not text or text.lower() in ("(null)", "n/a"):
        return None
    total = 0
    for item in text.split(","):
        last = item.strip().rsplit(":", 1)[-1]
        m = re.fullmatch(r"(\d+)(?:\(.*\))?", last)
        if not m:
            raise ResourceError(f"cannot read a GPU count from {text!r}")
        total += int(m.group(1))
    return total


def _split_evenly(total: int, n: int) -> list[int]:
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def nodes_from_environment(env: Mapping[str, str], default_cores: int,
                           default_gpus: int) -> list[tuple[str, int, int]]:
    """The nodes of the SLURM allocation this process runs in, as ``(name, cores, gpus)``.

    Names come from ``SLURM_JOB_NODELIST``; cores from ``SLURM_JOB_CPUS_PER_NODE`` (else
    ``SLURM_CPUS_ON_NODE`` on every node, else ``default_cores`` spread over the nodes); GPUs
    from ``SLURM_GPUS_ON_NODE`` / ``SLURM_GPUS_PER_NODE`` / ``SLURM_JOB_GPUS`` (else
    ``default_gpus`` spread over the nodes). Raises ResourceError outside an allocation.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ResourceError("not inside a SLURM allocation: SLURM_JOB_NODELIST is not set")
    names = expand_nodelist(nodelist)
    if not names:
        raise ResourceError(f"SLURM_JOB_NODELIST={nodelist!r} names no node")
    n = len(names)
    num = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if num and num.isdigit() and int(num) != n:
        raise ResourceError(f"SLURM_JOB_NODELIST={nodelist!r} has {n} nodes but "
                            f"SLURM_JOB_NUM_NODES={num}")

    cores: list[int]
    if env.get("SLURM_JOB_CPUS_PER_NODE"):
        cores = expand_counts(env["SLURM_JOB_CPUS_PER_NODE"])
        if len(cores) != n:
            raise ResourceError(f"SLURM_JOB_CPUS_PER_NODE={env['SLURM_JOB_CPUS_PER_NODE']!r} "
                                f"does not match {n} nodes")
    elif (env.get("SLURM_CPUS_ON_NODE") or "").isdigit():
        cores = [int(env["SLURM_CPUS_ON_NODE"])] * n
    else:
        cores = _split_evenly(max(int(default_cores), n), n)

    per_node_gpus = None
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(var):
            per_node_gpus = _gpu_count(env[var])
            if per_node_gpus is not None:
                break
    if per_node_gpus is None and env.get("SLURM_JOB_GPUS"):
        ids = [g for g in env["SLURM_JOB_GPUS"].split(",") if g.strip()]
        per_node_gpus = len(ids) or None
    gpus = [per_node_gpus] * n if per_node_gpus is not None else \
        _split_evenly(int(default_gpus), n)
    return [(name, c, g) for name, c, g in zip(names, cores, gpus, strict=True)]


# -- open files ------------------------------------------------------------------------------------

NOFILE_CAP = 1 << 20  # a soft limit higher than this buys nothing and costs kernel tables


def raise_nofile_limit() -> tuple[int, int, int]:
    """Raise the RLIMIT_NOFILE soft limit toward the hard limit, as other runtimes do
    (Go, the JVM, systemd services). Returns (soft before, soft now, hard). Blocking."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else NOFILE_CAP
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as fh:  # the kernel's ceiling
            target = min(target, int(fh.read()))
    except (OSError, ValueError):
        pass
    target = min(target, NOFILE_CAP)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    else:
        target = soft
    return soft, target, hard


def open_fd_count() -> int:
    """How many fds this process holds now. Blocking (it lists /proc/self/fd)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64  # no /proc: a guess that errs on the side of a smaller budget


# -- srun ------------------------------------------------------------------------------------------

def srun_layout(cores: int, gpus: int, ranks: int,
                nodes: Sequence[tuple[int, int]]) -> tuple[int, int, int]:
    """Where a srun unit goes: ``(node count, cores per node, gpus per node)``.

    ``nodes`` are the allocation's ``(cores, gpus)``. A unit that fits on one node stays on
    one. A bigger one is spread evenly over the fewest nodes that can hold it, ``N =
    ceil(cores / biggest node)``, and its ranks and GPUs must divide by N. Each share is then
    more than half of the biggest node, so the agent's scheduler can never put two shares of
    one unit on the same node. Raises ResourceError saying why a unit cannot be laid out.
    """
    if ranks < 1 or cores % ranks:
        raise ResourceError(f"cores ({cores}) must be a multiple of ranks ({ranks})")
    if any(c >= cores and g >= gpus for c, g in nodes):
        return 1, cores, gpus
    biggest = max(c for c, _ in nodes)
    count = -(-cores // biggest)
    if ranks % count or gpus % count:
        raise ResourceError(
            f"{cores} cores need {count} nodes of {biggest} cores; ranks ({ranks}) and gpus "
            f"({gpus}) must divide evenly over {count} nodes")
    share, gshare = cores // count, gpus // count
    fitting = sum(1 for c, g in nodes if c >= share and g >= gshare)
    if fitting < count:
        raise ResourceError(
            f"{cores} cores, {gpus} gpus need {count} nodes with {share} cores and {gshare} "
            f"gpus each; the pilot has {fitting} such node(s)")
    return count, share, gshare


def srun_argv(node_names: Sequence[str], ranks: int, cores: int, gpus: int,
              argv: Sequence[str]) -> list[str]:
    """The unit's command line under ``srun``: one step on exactly these nodes and cores."""
    n = len(node_names)
    out = ["srun", f"--nodes={n}", f"--nodelist={','.join(node_names)}",
           f"--ntasks={ranks}", f"--ntasks-per-node={ranks // n}",
           f"--cpus-per-task={cores // ranks}", "--exact", "--kill-on-bad-exit=1"]
    if gpus:
        out.append(f"--gpus={gpus}")
    return out + list(argv)


class SrunPlacer:
    """Cores for ``launch="srun"`` units from the agent's scheduler, and their srun argv."""

    def __init__(self, sched: Any) -> None:
        self.sched = sched
        # One multi-node unit gathers its nodes at a time: two of them each holding one node
        # and waiting for the other's could otherwise wait forever.
        self._gather = Semaphore()

    def place(self, desc: Mapping[str, Any], argv: Sequence[str],
              extra: list[Any]) -> tuple[Any, list[str]]:
        """(slots on the first node, srun command line); the unit's shares of its other nodes
        are appended to ``extra`` as they are taken (the caller frees them, also on error)."""
        sched = self.sched
        cores, gpus = int(desc["cores"]), int(desc["gpus"])
        ranks = int(desc.get("ranks") or 1)
        count, share, gshare = srun_layout(
            cores, gpus, ranks, list(zip(sched.total_cores.tolist(), sched.total_gpus.tolist(),
                                          strict=True)))
        if count == 1:
            slots = sched.allocate(cores, gpus)
        else:
            with self._gather:
                slots = sched.allocate(share, gshare)
                try:
                    for _ in range(count - 1):
                        extra.append(sched.allocate(share, gshare))
                except BaseException:
                    sched.free(slots)
                    raise
        names = [sched.node_names[s.node] for s in (slots, *extra)]
        return slots, srun_argv(names, ranks, cores, gpus, argv)
