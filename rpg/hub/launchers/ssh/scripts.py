"""What the SSH launcher runs on the remote machine: POSIX sh scripts (fed to ``/bin/sh -s``,
whatever the login shell) that make the pilot sandbox, start the agent detached, report on it
and stop it, and the rpg package they unpack there. Pure text; the launcher runs them.
"""

from __future__ import annotations

import io
import os
import posixpath
import shlex
import tarfile

from rpg.hub.launchers.base import AGENT_CONFIG, AGENT_TOKEN, LaunchError

RPG_PACKAGE = os.path.dirname(os.path.abspath(__import__("rpg").__file__))
NO_PYTHON = 91  # exit status of sandbox_script: the remote python is not there
BAD_SANDBOX = 93  # ... the sandbox is a link, not ours, or writable by others
CANNOT_UNPACK = 92  # exit status of start_script: rpg could not be unpacked
RELAY_FAILED = 96  # exit status of relay_start_script: the relay did not come up

EXIT_CODE = "exit_code"  # in the pilot sandbox: the agent's exit status, once it has one

# Start the agent as a session leader (os.setsid) and run it in this process (the pid stays
# the agent's), so that whatever ends it at the Python level, an import error before its main
# included, leaves its exit status and traceback: only a signal leaves no exit code.
_DETACH = (
    "import os, runpy, sys, traceback\n"
    "os.setsid()\n"
    "code = 1\n"
    "try:\n"
    "    sys.argv = ['rpg.agent'] + sys.argv[1:]\n"
    "    runpy.run_module('rpg.agent', run_name='__main__', alter_sys=True)\n"
    "    code = 0\n"
    "except SystemExit as e:\n"
    "    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)\n"
    "except BaseException:\n"
    "    traceback.print_exc()\n"
    "finally:\n"
    "    p = os.environ.get('RPG_EXIT_CODE_FILE')\n"
    "    if p and not (os.path.exists(p) and os.path.getsize(p)):\n"
    "        with open(p, 'w') as fh:\n"
    "            fh.write(str(code))\n"
    "sys.exit(code)\n")


def sandbox_script(python: str, root: str | None, session_uid: str, pilot_uid: str) -> str:
    """Make (or accept) <root>/<session>/<pilot>, private; prints its canonical path (pwd -P).
    ``root`` None is ~/rpg (or /tmp/rpg without a home); ~ and ~/path are the remote home."""
    q = shlex.quote
    if root is None:
        root_expr = '"${HOME:-/tmp}"/rpg'
    elif root == "~" or root.startswith("~/"):
        root_expr = '"$HOME"' + (q(root[1:]) if len(root) > 1 else "")
    elif root.startswith("~"):
        raise LaunchError(f"sandbox {root!r}: only ~ and ~/path are understood")
    else:
        root_expr = q(root)
    return (
        "umask 077\n"
        f"if ! command -v {q(python)} >/dev/null 2>&1; then\n"
        "  printf 'remote python %s not found on %s (PATH=%s)\\n' "
        f"{q(python)} \"$(hostname)\" \"$PATH\" >&2; exit {NO_PYTHON}\nfi\n"
        f"sb={root_expr}/{q(session_uid)}/{q(pilot_uid)}\n"
        # A pre-existing sandbox must be a real directory of ours nobody else can write to
        # (anyone who can could plant links where the agent's files go).
        'if [ -L "$sb" ]; then printf \'pilot sandbox %s is a symbolic link: refusing it\\n\' '
        f'"$sb" >&2; exit {BAD_SANDBOX}; fi\n'
        'mkdir -p -- "$sb" || exit 90\n'
        'cd -P -- "$sb" || exit 90\n'
        "set -- $(ls -ldn .)\n"
        'case "$1" in ?????w*|????????w*) printf \'pilot sandbox %s is writable by group or '
        f"others (%s): refusing it\\n' \"$sb\" \"$1\" >&2; exit {BAD_SANDBOX};; esac\n"
        'if [ "$3" != "$(id -u)" ]; then printf \'pilot sandbox %s is owned by uid %s, not '
        f"by this user: refusing it\\n' \"$sb\" \"$3\" >&2; exit {BAD_SANDBOX}; fi\n"
        "pwd -P\n")


def unpack_script(sandbox: str) -> str:
    """Unpack rpg.tar.gz into <sandbox>/lib (the agent's rpg)."""
    return (
        f"cd -- {shlex.quote(sandbox)} || exit 90\n"
        "mkdir -p lib && tar -xzf rpg.tar.gz -C lib && rm -f rpg.tar.gz || "
        f"{{ echo 'cannot unpack rpg in the pilot sandbox' >&2; exit {CANNOT_UNPACK}; }}\n")


def start_script(sandbox: str, python: str, pilot_key: str) -> str:
    """Unpack rpg.tar.gz into <sandbox>/lib and start the agent detached; prints its pid."""
    q = shlex.quote
    cfg_path = posixpath.join(sandbox, AGENT_CONFIG)
    return (
        unpack_script(sandbox)
        + f"PYTHONPATH={q(sandbox + '/lib')}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        # the agent carries its units' marker too: the final sweep finds it if all else fails
        f"RPG_PILOT_KEY={q(pilot_key)}\n"
        f"RPG_EXIT_CODE_FILE={q(posixpath.join(sandbox, EXIT_CODE))}\n"
        "export PYTHONPATH RPG_PILOT_KEY RPG_EXIT_CODE_FILE\n"
        f"{q(python)} -c {q(_DETACH)} --config {q(cfg_path)} "
        "> agent.out 2> agent.err < /dev/null &\n"
        "echo $!\n")


_RELAY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.py")


def relay_start_script(sandbox: str, python: str, listen_host: str, forward_port: int,
                       listen_port: int = 0) -> str:
    """Write relay.py into the sandbox and start it detached (its own session); prints
    ``RELAY host port`` once it listens, or exits RELAY_FAILED with its stderr. A restart
    asks for the port the agent knows (``listen_port``)."""
    q = shlex.quote
    with open(_RELAY_PATH, encoding="utf-8") as fh:
        relay = fh.read()
    return (
        f"cd -- {q(sandbox)} || exit 90\n"
        "rm -f relay.port\n"  # a restart's: the new relay writes its own
        f"cat > relay.py <<'__RPG_RELAY__'\n{relay}\n__RPG_RELAY__\n"
        f"{q(python)} -c 'import os, sys; os.setsid(); os.execv(sys.executable, "
        f"[sys.executable] + sys.argv[1:])' relay.py {q(listen_host)} {int(forward_port)} "
        f"{q(sandbox)} {int(listen_port)} > relay.out 2> relay.err < /dev/null &\n"
        "echo $! > relay.pid\n"
        "n=0; while [ ! -s relay.port ] && [ $n -lt 100 ]; do\n"
        "  kill -0 $(cat relay.pid) 2>/dev/null || break; sleep 0.1; n=$((n+1)); done\n"
        "if [ -s relay.port ]; then echo RELAY $(cat relay.port); exit 0; fi\n"
        "echo 'the relay did not start:' >&2; tail -c 2000 relay.err >&2\n"
        f"exit {RELAY_FAILED}\n")


def _is_relay_of(sandbox: str) -> str:
    """sh test: process $p runs relay.py for this sandbox (a reused pid does not)."""
    q = shlex.quote
    return (f"tr '\\000' '\\n' < /proc/$p/cmdline 2>/dev/null | grep -qx relay.py && "
            f"tr '\\000' '\\n' < /proc/$p/cmdline 2>/dev/null | grep -qxF -- {q(sandbox)}")


def relay_alive_script(sandbox: str) -> str:
    """Prints ``relay alive`` or ``relay dead`` (by its pid file and command line)."""
    q = shlex.quote
    pid_file = posixpath.join(sandbox, "relay.pid")
    return (
        f"p=$(cat {q(pid_file)} 2>/dev/null)\n"
        f"if [ -n \"$p\" ] && {_is_relay_of(sandbox)}"
        "; then echo relay alive; else echo relay dead; fi\n")


def relay_stop_script(sandbox: str) -> str:
    """SIGTERM the relay of this sandbox (by its pid file, if that pid still runs relay.py)."""
    q = shlex.quote
    pid_file = posixpath.join(sandbox, "relay.pid")
    return (
        f"if [ -s {q(pid_file)} ]; then p=$(cat {q(pid_file)})\n"
        f"  if {_is_relay_of(sandbox)}; then\n"
        "    kill -TERM $p 2>/dev/null && echo relay_stopped; fi\nfi\n")


def status_script(sandbox: str, agent_pid: int) -> str:
    """Prints alive | exited <code> | gone | nosandbox; agent.err's tail on stderr."""
    q = shlex.quote
    return (
        _alive_fn(agent_pid, posixpath.join(sandbox, AGENT_CONFIG))
        + f"cd -- {q(sandbox)} 2>/dev/null || {{ echo nosandbox; exit 0; }}\n"
        "if [ -s exit_code ]; then echo exited; cat exit_code; echo; "
        "tail -c 3000 agent.err >&2; exit 0; fi\n"
        "if alive; then echo alive; exit 0; fi\n"
        "sleep 0.3; if alive; then echo alive; exit 0; fi\n"  # be sure before saying gone
        # it may have written its exit code between the two checks
        "if [ -s exit_code ]; then echo exited; cat exit_code; echo; else echo gone; fi\n"
        "tail -c 3000 agent.err >&2\n")


def stop_script(sandbox: str, agent_pid: int | None, grace: float, term_grace: float,
                python: str, pilot_key: str, keep_sandbox: bool) -> str:
    """Wait ``grace`` s for the agent, SIGTERM, ``term_grace`` s, SIGKILL; sweep the pilot's
    unit processes; remove the sandbox (or only the token file, with ``keep_sandbox``). Prints
    agent_terminated, agent_killed, swept <n>, removed as they happen."""
    q = shlex.quote
    parts = []
    if agent_pid is not None:
        ticks, term_ticks = max(1, int(grace * 5)), int(term_grace * 5)
        parts.append(
            _alive_fn(agent_pid, posixpath.join(sandbox, AGENT_CONFIG))
            + f"n=0; while alive && [ $n -lt {ticks} ]; do sleep 0.2; n=$((n+1)); done\n"
            f"if alive; then kill -TERM {agent_pid} 2>/dev/null; echo agent_terminated\n"
            f"  n=0; while alive && [ $n -lt {term_ticks} ]; do sleep 0.2; n=$((n+1)); done\n"
            "fi\n"
            f"if alive; then kill -KILL {agent_pid} 2>/dev/null; echo agent_killed; fi\n")
    # Units live in their own sessions: whatever is left of them (the agent died hard, or
    # never heard the end) carries RPG_PILOT_KEY; rpg.io_pool.sweep finds it in /proc.
    # A daemon that cleared its environment is still found by its cwd in the sandbox.
    sweep = ("import sys; from rpg.io_pool.sweep import kill_pilot_processes; "
             "print(kill_pilot_processes(sys.argv[1], sys.argv[2]))")
    parts.append(
        f"echo swept $(PYTHONPATH={q(sandbox + '/lib')} {q(python)} -c {q(sweep)} "
        f"{q(pilot_key)} {q(sandbox)} 2>/dev/null)\n")
    if keep_sandbox:  # the agent deletes its token file when it starts; one that never did
        parts.append(f"rm -f -- {q(posixpath.join(sandbox, AGENT_TOKEN))}\n")
    else:
        parts.append(f"rm -rf -- {q(sandbox)} && echo removed\n"
                     f"rmdir -- {q(posixpath.dirname(sandbox))} 2>/dev/null\n")
    parts.append("exit 0\n")
    return "".join(parts)


def _alive_fn(pid: int, cfg_path: str) -> str:
    """sh function ``alive``: the agent's pid still runs the agent (not a zombie, not reused)."""
    q = shlex.quote
    return (
        "alive() {\n"
        f"  if [ ! -d /proc/self ]; then kill -0 {pid} 2>/dev/null; return; fi\n"
        f"  [ -r /proc/{pid}/cmdline ] || return 1\n"
        f"  tr '\\000' '\\n' < /proc/{pid}/cmdline 2>/dev/null | grep -qxF -- {q(cfg_path)}"
        " || return 1\n"
        f"  ! grep -q '^State:[[:space:]]*Z' /proc/{pid}/status 2>/dev/null\n"
        "}\n")


def tail_lines(text: str, n: int = 5) -> str:
    """The last ``n`` non-empty lines of a script's output, on one line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def rpg_tarball() -> bytes:
    """The local rpg package (sources only) as a .tar.gz; a few hundred KB."""
    def skip_cache(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        base = posixpath.basename(info.name)
        if base == "__pycache__" or base.endswith((".pyc", ".pyo")):
            return None
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        tar.add(RPG_PACKAGE, arcname="rpg", filter=skip_cache)
    return buf.getvalue()
