"""PilotDescription, UnitDescription and staging directives, validated at construction.

Unknown fields and bad values raise ``DescriptionError``, whose message names the description,
the field and the problem. Descriptions are plain data: ``as_dict()`` is what crosses process
boundaries (the hub and the agent take the session's validated copy as it is).
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any, Callable

from rpg import calls as _calls

MAX_STR = 4096
MAX_ARGS = 10_000


class DescriptionError(ValueError):
    """A description field is unknown or has a bad value."""

    def __init__(self, where: str, field: str, problem: str) -> None:
        super().__init__(f"{where}.{field}: {problem}")
        self.where = where
        self.field = field
        self.problem = problem


# -- field checks --------------------------------------------------------------------------------

Check = Callable[[str, str, Any], Any]


def _utf8(where: str, field: str, s: str) -> str:
    """Refuse text that cannot cross the wire: every string travels as UTF-8."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DescriptionError(
            where, field,
            f"is not valid UTF-8 text: {exc.reason} at position {exc.start} (a lone surrogate, "
            f"as os.fsdecode gives for a non-UTF-8 file name; pass such names as UTF-8 or "
            f"rename them)") from None
    return s


def _str(required: bool = False, max_len: int = MAX_STR) -> Check:
    def check(where: str, field: str, v: Any) -> Any:
        if v is None and not required:
            return None
        if not isinstance(v, str):
            raise DescriptionError(where, field, f"must be a string, got {type(v).__name__}")
        if required and not v.strip():
            raise DescriptionError(where, field, "must not be empty")
        if len(v) > max_len:
            raise DescriptionError(where, field, f"is {len(v)} characters long (max {max_len})")
        if "\x00" in v:
            raise DescriptionError(where, field, "must not contain NUL bytes")
        return _utf8(where, field, v)
    return check


def _int(lo: int, hi: int = 10**9) -> Check:
    def check(where: str, field: str, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int):
            raise DescriptionError(where, field, f"must be an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise DescriptionError(where, field, f"must be between {lo} and {hi}, got {v}")
        return v
    return check


def _num(lo: float, hi: float = 1e9, optional: bool = False, open_lo: bool = True) -> Check:
    def check(where: str, field: str, v: Any) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DescriptionError(where, field, f"must be a number, got {type(v).__name__}")
        if v != v or (v <= lo if open_lo else v < lo) or v > hi:
            rel = ">" if open_lo else ">="
            raise DescriptionError(where, field, f"must be {rel} {lo} and <= {hi}, got {v}")
        return float(v)
    return check


def _optional(check: Check) -> Check:
    def wrapped(where: str, field: str, v: Any) -> Any:
        return None if v is None else check(where, field, v)
    return wrapped


def _bool(where: str, field: str, v: Any) -> Any:
    if not isinstance(v, bool):
        raise DescriptionError(where, field, f"must be True or False, got {type(v).__name__}")
    return v


def _str_list(where: str, field: str, v: Any) -> Any:
    if v is None:
        return []
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        raise DescriptionError(where, field, f"must be a list of strings, got {type(v).__name__}")
    if len(v) > MAX_ARGS:
        raise DescriptionError(where, field, f"has {len(v)} items (max {MAX_ARGS})")
    out = []
    for i, item in enumerate(v):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise DescriptionError(
                where, f"{field}[{i}]", f"must be a string or number, got {type(item).__name__}")
        s = str(item)
        if "\x00" in s or len(s) > 128 * 1024:
            raise DescriptionError(where, f"{field}[{i}]", "is too long or contains NUL bytes")
        out.append(_utf8(where, f"{field}[{i}]", s))
    return out


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env(where: str, field: str, v: Any) -> Any:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise DescriptionError(where, field,
                               f"must be a dict of str to str, got {type(v).__name__}")
    out = {}
    for k, val in v.items():
        if not isinstance(k, str) or not _ENV_NAME.match(k):
            raise DescriptionError(where, field, f"bad variable name {k!r}")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise DescriptionError(
                where, f"{field}[{k!r}]", f"must be a string or number, got {type(val).__name__}")
        s = str(val)
        if "\x00" in s:
            raise DescriptionError(where, f"{field}[{k!r}]", "must not contain NUL bytes")
        out[k] = _utf8(where, f"{field}[{k!r}]", s)
    return out


def _tags(where: str, field: str, v: Any) -> Any:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise DescriptionError(where, field,
                               f"must be a dict of str to str, got {type(v).__name__}")
    for k, val in v.items():
        if not isinstance(k, str) or not isinstance(val, str):
            raise DescriptionError(where, field, f"tag {k!r}: keys and values must be strings")
        _utf8(where, f"{field}[{k!r}]", k)
        _utf8(where, f"{field}[{k!r}]", val)
    return dict(v)


def _file_name(where: str, field: str, v: Any) -> Any:
    v = _str(required=True, max_len=255)(where, field, v)
    if "/" in v or v in (".", ".."):
        raise DescriptionError(where, field, f"must be a plain file name, got {v!r}")
    return v


# -- staging ---------------------------------------------------------------------------------------

STAGING_ACTIONS = ("copy", "link", "move", "transfer")
STAGING_FLAGS = ("create_parents", "non_fatal", "recursive")
SCHEMES = ("client", "pilot", "unit")


def split_url(path: str) -> tuple[str, str]:
    """``"pilot://a/b"`` -> ``("pilot", "a/b")``; a bare path is ``("", path)``."""
    m = re.match(r"^([a-z]+)://(.*)$", path)
    if not m:
        return "", path
    return m.group(1), m.group(2)


def escapes(rel: str) -> bool:
    """True if a relative path leaves its root (``..`` above it, or absolute)."""
    if rel.startswith("/"):
        return True
    norm = posixpath.normpath(rel)
    return norm == ".." or norm.startswith("../")


class StagingDirective:
    """One staging step: ``{source, target, action, flags}``.

    Sandbox-side paths (the target of input staging, the source of output staging) are relative
    to the unit sandbox (or ``pilot://`` for the pilot sandbox) and must not leave it. The other
    side may be an absolute path or ``client://path`` on the application's machine.
    """

    def __init__(self, d: dict[str, Any], where: str, direction: str) -> None:
        if not isinstance(d, dict):
            raise DescriptionError(
                where, "", f"a staging directive must be a dict, got {type(d).__name__}")
        unknown = set(d) - {"source", "target", "action", "flags"}
        if unknown:
            raise DescriptionError(where, sorted(unknown)[0], "unknown staging field")
        self.source: str = _str(required=True)(where, "source", d.get("source"))
        target = d.get("target")
        if target is None:
            target = posixpath.basename(split_url(self.source)[1].rstrip("/")) or "."
        self.target: str = _str(required=True)(where, "target", target)
        action = d.get("action", "copy")
        if action not in STAGING_ACTIONS:
            raise DescriptionError(
                where, "action", f"must be one of {', '.join(STAGING_ACTIONS)}, got {action!r}")
        self.action: str = action
        flags = d.get("flags", ["create_parents"])
        if isinstance(flags, str):
            flags = [flags]
        if not isinstance(flags, (list, tuple)) or any(f not in STAGING_FLAGS for f in flags):
            raise DescriptionError(where, "flags", f"must be a list of {', '.join(STAGING_FLAGS)}")
        self.flags: list[str] = list(flags)
        self.direction = direction
        inner, outer = ("target", "source") if direction == "in" else ("source", "target")
        self._check_inner(where, inner, getattr(self, inner))
        self._check_outer(where, outer, getattr(self, outer))
        if self.action == "transfer" and split_url(getattr(self, outer))[0] != "client":
            raise DescriptionError(where, "action", "'transfer' needs a client:// side")

    @staticmethod
    def _check_inner(where: str, field: str, path: str) -> None:
        scheme, rel = split_url(path)
        if scheme not in ("", "unit", "pilot"):
            raise DescriptionError(
                where, field,
                f"the sandbox side must be relative, unit:// or pilot://, got {path!r}")
        if escapes(rel):
            raise DescriptionError(
                where, field, f"{path!r} escapes the sandbox (absolute or '..' above it)")

    @staticmethod
    def _check_outer(where: str, field: str, path: str) -> None:
        scheme, rel = split_url(path)
        if scheme and scheme not in SCHEMES:
            raise DescriptionError(where, field, f"unknown scheme {scheme!r}:// in {path!r}")
        if scheme in ("unit", "pilot") and escapes(rel):
            raise DescriptionError(where, field, f"{path!r} escapes the sandbox")

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "action": self.action,
                "flags": list(self.flags)}


def _staging(direction: str) -> Check:
    def check(where: str, field: str, v: Any) -> Any:
        if v is None:
            return []
        if not isinstance(v, (list, tuple)):
            raise DescriptionError(where, field,
                                   f"must be a list of directives, got {type(v).__name__}")
        out = []
        for i, d in enumerate(v):
            if isinstance(d, StagingDirective):
                d = d.as_dict()
            if isinstance(d, str):  # shorthand: a path staged under its own name
                d = {"source": d} if direction == "in" else {"source": d, "target": d}
            out.append(StagingDirective(d, f"{where}.{field}[{i}]", direction).as_dict())
        return out
    return check


# -- descriptions ----------------------------------------------------------------------------------

def _copy(v: Any) -> Any:
    """A copy of plain description data (lists and dicts of scalars), much cheaper than
    copy.deepcopy; anything else is kept as it is and left to the field checks."""
    if isinstance(v, list):
        return [_copy(x) for x in v]
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    return v


class _Description:
    """Base: a fixed set of validated fields, from keywords or a dict."""

    _fields: dict[str, tuple[Any, Check]] = {}

    def __init__(self, from_dict: dict[str, Any] | None = None, **kw: Any) -> None:
        where = type(self).__name__
        values: dict[str, Any] = {}
        if from_dict is not None:
            if not isinstance(from_dict, dict):
                raise DescriptionError(where, "", f"expects a dict or keywords, got "
                                                  f"{type(from_dict).__name__}")
            values.update(from_dict)
        values.update(kw)
        unknown = sorted(set(values) - set(self._fields))
        if unknown:
            raise DescriptionError(
                where, unknown[0], f"unknown field (known: {', '.join(sorted(self._fields))})")
        for name, (default, _check) in self._fields.items():
            object.__setattr__(self, name, _copy(values.get(name, default)))
        self.validate()

    def validate(self) -> None:
        """Check (and normalise) every field; raises DescriptionError naming the first bad one."""
        where = type(self).__name__
        for name, (_default, check) in self._fields.items():
            object.__setattr__(self, name, check(where, name, getattr(self, name)))
        self._validate_more(where)

    def _validate_more(self, where: str) -> None:
        pass

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._fields:
            raise DescriptionError(type(self).__name__, name, "unknown field")
        object.__setattr__(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return {name: _copy(getattr(self, name)) for name in self._fields}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()
                           if v not in (None, [], {}))
        return f"{type(self).__name__}({fields})"


def _function(where: str, field: str, v: Any) -> Any:
    if v is None or callable(v):
        return v
    if isinstance(v, str):  # the wire form: the packed function's name
        return _str(max_len=512)(where, field, v)
    raise DescriptionError(where, field, f"must be callable, got {type(v).__name__}")


def _args(where: str, field: str, v: Any) -> Any:
    if not isinstance(v, (tuple, list)):
        raise DescriptionError(where, field, f"must be a tuple or list, got {type(v).__name__}")
    return tuple(v)


def _kwargs(where: str, field: str, v: Any) -> Any:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise DescriptionError(where, field, "must be a dict with string keys")
    return v


def _call_list(where: str, field: str, v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):  # the wire form: how many were packed
        return _int(1, _calls.MAX_CALLS)(where, field, v)
    if not isinstance(v, (list, tuple)) or not v or len(v) > _calls.MAX_CALLS:
        raise DescriptionError(where, field, f"must be a list of 1 to {_calls.MAX_CALLS} "
                                             f"(function, args[, kwargs]) tuples")
    out = []
    for i, c in enumerate(v):
        if not isinstance(c, (tuple, list)) or not 1 <= len(c) <= 3 or not callable(c[0]):
            raise DescriptionError(where, f"{field}[{i}]",
                                   "must be (function, args[, kwargs]) with a callable first")
        out.append((c[0], _args(where, f"{field}[{i}].args", c[1] if len(c) > 1 else ()),
                    _kwargs(where, f"{field}[{i}].kwargs", c[2] if len(c) > 2 else {})))
    return out


def _payload(where: str, field: str, v: Any) -> Any:
    if v is None:
        return None
    if not isinstance(v, bytes):
        raise DescriptionError(where, field, f"must be bytes, got {type(v).__name__}")
    if len(v) > _calls.MAX_PAYLOAD:
        raise DescriptionError(where, field, f"is {len(v)} bytes (max {_calls.MAX_PAYLOAD})")
    return v


_PACKER = _calls.Packer()


def function_name(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or "?"
    return f"{mod}.{getattr(fn, '__qualname__', type(fn).__name__)}"[:512]


class UnitDescription(_Description):
    """What to run, with what, and what to stage. Fields as in RADICAL-Pilot's TaskDescription.

    Either an ``executable`` (with ``arguments``), or a Python ``function`` called with
    ``args`` and ``kwargs`` in a warm worker of the pilot (``unit.result``), or ``calls``, a
    list of ``(function, args[, kwargs])`` run in order in one worker (``unit.result`` is then
    the list of values, an exception object for a call that raised). Functions and arguments
    are packed with cloudpickle at validation (``payload``, what travels); one that does not
    pickle is refused, naming it.
    """

    _fields = {
        "executable": (None, _optional(_str(required=True))),
        "function": (None, _function),
        "args": ((), _args),
        "kwargs": ({}, _kwargs),
        "calls": (None, _call_list),
        "payload": (None, _payload),
        "arguments": ([], _str_list),
        "environment": ({}, _env),
        "cores": (1, _int(1, 1_000_000)),
        "gpus": (0, _int(0, 100_000)),
        "input_staging": ([], _staging("in")),
        "output_staging": ([], _staging("out")),
        "stdout": ("STDOUT", _file_name),
        "stderr": ("STDERR", _file_name),
        "pre_exec": ([], _str_list),
        "timeout": (None, _num(0.0, 10 * 365 * 86400.0, optional=True)),
        # runtime: an estimate (s) of how long it runs; a pilot with less time left does not
        # take it (binding.py), nor start it (the agent), and leaves it for another pilot.
        "runtime": (None, _num(0.0, 10 * 365 * 86400.0, optional=True)),
        "tags": ({}, _tags),
        "name": (None, _str(max_len=256)),
        "restartable": (False, _bool),
        # retries=N: a unit that FAILED runs again, up to N times, on another pilot when one
        # of its manager's fits it (rpg/hub/moves.py, Moves.retry).
        "retries": (0, _int(0, 100)),
        # launch="srun": the agent of a SLURM pilot starts the unit as a job step, as `ranks`
        # tasks of cores/ranks cores each, spread over several nodes if one is too small.
        "launch": (None, _str(max_len=16)),
        "ranks": (1, _int(1, 1_000_000)),
    }

    def _validate_more(self, where: str) -> None:
        packed = callable(self.function) or isinstance(self.calls, list)
        wire = self.payload is not None and not packed
        kinds = [k for k, on in (("executable", self.executable is not None),
                                 ("function", self.function is not None),
                                 ("calls", self.calls is not None)) if on]
        if wire:
            kinds = ["function" if self.function is not None else "calls"]
            if self.executable is not None:
                kinds.insert(0, "executable")
        if len(kinds) != 1:
            raise DescriptionError(where, kinds[1] if kinds else "executable",
                                   "give exactly one of executable, function and calls"
                                   + ("" if kinds else " (none was given)"))
        if kinds[0] != "executable":
            self._check_function_unit(where, packed)
        if self.stdout == self.stderr:
            raise DescriptionError(where, "stderr", "must differ from stdout")
        if self.launch not in (None, "srun"):
            raise DescriptionError(where, "launch", f"must be None or 'srun', got {self.launch!r}")
        if self.ranks > 1 and self.launch != "srun":
            raise DescriptionError(where, "ranks", "ranks > 1 needs launch='srun'")
        if self.cores % self.ranks:
            raise DescriptionError(
                where, "ranks", f"must divide cores ({self.cores}), got {self.ranks}")


    def _check_function_unit(self, where: str, packed: bool) -> None:
        for field, bad in (("cores", self.cores != 1), ("gpus", self.gpus != 0),
                           ("launch", self.launch is not None), ("arguments", self.arguments),
                           ("pre_exec", self.pre_exec)):
            if bad:
                raise DescriptionError(where, field, "a function unit runs in one warm worker "
                                                     "on one core: use an executable for this")
        if not packed:
            if self.payload is None:
                raise DescriptionError(where, "payload", "a packed function unit needs it")
            return
        if callable(self.function):
            todo = [(self.function, "call", (self.args, self.kwargs))]
            prefix = ""
        else:
            if self.args or self.kwargs:
                raise DescriptionError(where, "args", "goes with function, not calls")
            todo = [(f, "call", (a, k)) for f, a, k in self.calls]
            prefix = "calls"
        try:
            payload, _ = _PACKER.pack(todo, prefix)
        except _calls.CallPackError as exc:
            raise DescriptionError(where, exc.where, exc.problem) from None
        object.__setattr__(self, "payload", payload)

    def as_dict(self) -> dict[str, Any]:
        """The wire form: a function unit's callables travel packed in ``payload`` (the hub
        never unpickles it); ``function`` is its name, ``calls`` how many calls it holds."""
        d = super().as_dict()
        if self.payload is not None:
            fn = self.function
            d["function"] = function_name(fn) if callable(fn) else fn
            d["calls"] = len(self.calls) if isinstance(self.calls, list) else (self.calls or 1)
            d["args"], d["kwargs"] = (), {}
        return d


RESOURCE_RE = re.compile(
    r"^(local|slurm|(ssh|slurm\+ssh)://([A-Za-z0-9._-]+@)?[A-Za-z0-9._-]+(:[0-9]{1,5})?)$")


def _resource(where: str, field: str, v: Any) -> Any:
    v = _str(required=True, max_len=512)(where, field, v)
    if not RESOURCE_RE.match(v):
        raise DescriptionError(
            where, field,
            f"must be 'local', 'slurm', 'ssh://[user@]host[:port]' or "
            f"'slurm+ssh://[user@]host[:port]', got {v!r}")
    return v


def _abs_or_none(where: str, field: str, v: Any) -> Any:
    v = _str()(where, field, v)
    if v is not None and not (v.startswith("/") or v.startswith("~")):
        raise DescriptionError(where, field, f"must be an absolute path, got {v!r}")
    return v


_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def _listen_host(where: str, field: str, v: Any) -> Any:
    """``auto``, or a host name or IPv4 address to listen on."""
    if not isinstance(v, str) or not _HOST.match(v):
        raise DescriptionError(where, field, f"must be 'auto', a host name or an IPv4 address, "
                                             f"got {v!r}")
    return v


def _one_of(*choices: str) -> Check:
    def check(where: str, field: str, v: Any) -> Any:
        if v not in choices:
            raise DescriptionError(where, field, f"must be one of {', '.join(choices)}, "
                                                 f"got {v!r}")
        return v
    return check


class PilotDescription(_Description):
    """A resource request: where (``resource``), how big (cores/gpus), how long (runtime)."""

    _fields = {
        "resource": ("local", _resource),
        "cores": (1, _int(1, 10_000_000)),
        "gpus": (0, _int(0, 1_000_000)),
        "runtime": (10.0, _num(0.0, 366 * 24 * 60.0)),
        "sandbox": (None, _abs_or_none),
        "environment": ({}, _env),
        "heartbeat_interval": (1.0, _num(0.01, 3600.0)),
        "heartbeat_timeout": (10.0, _num(0.05, 86400.0)),
        "staging_timeout": (300.0, _num(0.0, 86400.0)),
        "kill_grace": (2.0, _num(0.0, 3600.0, open_lo=False)),
        # the nice value of the units' processes against other sessions on the node (Linux
        # autogroup: rpg/agent/spawn_server.py); rpg's own loops keep 0
        "unit_nice": (19, _int(0, 19)),
        "tags": ({}, _tags),
        "keep_sandbox": (False, _bool),
        # function units: warm workers (None: one per core) and the RSS (MiB) after a unit
        # past which a worker is retired and replaced
        "function_workers": (None, _optional(_int(1, 100_000))),
        "function_worker_memory": (4096.0, _num(16.0, 1e9)),
        # ssh
        "ssh_key_file": (None, _abs_or_none),
        "ssh_known_hosts": ("~/.ssh/known_hosts", _abs_or_none),
        "ssh_trust_unknown_host": (False, _bool),
        "remote_python": ("python3", _str(required=True)),
        # the agent's environment there (rpg/hub/launchers/ssh/environment.py)
        "remote_env": ("create", _one_of("create", "use", "none")),
        "remote_env_cache": ("~/.cache/rpg", _abs_or_none),
        "remote_env_wheels": (None, _abs_or_none),
        # slurm+ssh://: where the login node's relay listens for the compute nodes' agents
        "relay_address": ("auto", _listen_host),
        # batch systems
        "queue": (None, _str(max_len=256)),
        "project": (None, _str(max_len=256)),
        "nodes": (None, _optional(_int(1, 1_000_000))),
        "job_name": (None, _str(max_len=256)),
    }

    def _validate_more(self, where: str) -> None:
        if self.heartbeat_timeout < self.heartbeat_interval:
            raise DescriptionError(where, "heartbeat_timeout",
                                   f"must be >= heartbeat_interval ({self.heartbeat_interval})")


def resolve_client_path(path: str) -> str:
    """``client://rel`` -> absolute path on the application's machine (string work only)."""
    scheme, rel = split_url(path)
    if scheme != "client":
        return path
    return os.path.abspath(os.path.expanduser(rel))
