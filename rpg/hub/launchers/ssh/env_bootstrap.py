"""Run on the remote host by ``remote_python`` (from stdin; standard library only, 3.8+):
check that python, or use or build the agent's environment (see ``environment.py``).

argv: mode cache key pins-json top-json wheels-dir-or-"-" build-timeout failed need-wheels.
Prints ``ENV <what happened>`` and ``PYTHON <path>``; on failure, the reason on stderr and
exit status ``failed``; ``need-wheels`` if it must build and the wheels are not uploaded yet.
Not imported by rpg: the launcher sends its text.
"""

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time

CHECK = ("import json\ntry:\n import importlib.metadata as m\nexcept ImportError:\n"
         " print('null'); raise SystemExit\nout = {}\nfor d in %r:\n try:\n"
         "  out[d] = m.version(d)\n except Exception:\n  out[d] = None\nprint(json.dumps(out))")


def tail(text, n=12):
    return "\n".join([ln for ln in text.strip().splitlines() if ln.strip()][-n:])


def problems(py, top, pins):
    r = subprocess.run([py, "-c", CHECK % (top,)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return ["cannot run it: " + tail(r.stderr, 3)]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    if got is None:
        v = sys.version_info
        return [f"Python {v[0]}.{v[1]} has no importlib.metadata (3.8+ needed)"]
    out = []
    for d in top:
        if got.get(d) is None:
            out.append(d + " missing")
        elif d == "cloudpickle" and got[d] != pins[d]:
            out.append(f"cloudpickle {got[d]} (the client has {pins[d]})")
    return out


def main():
    mode, cache, key, pins, top, wheels, build_timeout, failed, need_wheels = sys.argv[1:10]
    pins, top, build_timeout = json.loads(pins), json.loads(top), float(build_timeout)

    def fail(msg):
        sys.stderr.write(msg.rstrip() + "\n")
        sys.exit(int(failed))

    def found(what, py):
        print("ENV " + what)
        print("PYTHON " + py)
        sys.exit(0)

    here = problems(sys.executable, top, pins)
    if mode == "use" or not here:
        if here:
            fail(f"remote_python {sys.executable} lacks what the agent needs: "
                 f"{'; '.join(here)} (remote_env='use' takes it as it is; 'create' builds "
                 f"an environment)")
        found("system", sys.executable)
    root = os.path.expanduser(cache)
    os.makedirs(root, mode=0o700, exist_ok=True)
    d = os.path.join(root, f"env-{key}-py{sys.version_info[0]}{sys.version_info[1]}")
    py = os.path.join(d, "bin", "python")
    ready = os.path.join(d, ".rpg-ready")

    def usable():  # built, and its python still starts (its base interpreter may be gone)
        if not os.path.exists(ready):
            return False
        try:
            return subprocess.run([py, "-c", "0"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    if usable():
        found("reused " + d, py)
    if wheels != "-" and not os.path.isdir(wheels):
        sys.exit(int(need_wheels))
    lock = open(d + ".lock", "a")  # flock: released by the kernel if this builder dies
    t0 = time.time()
    waited = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            waited = True
            if time.time() - t0 > build_timeout:
                fail(f"another pilot has been building {d} for {build_timeout:.0f} s: giving up")
            time.sleep(0.3)
    if usable():
        found(f"reused {d} (built by another pilot meanwhile)", py)
    if os.path.exists(d):
        shutil.rmtree(d)  # half-built (its builder died), or its python no longer starts
    t1 = time.time()
    r = subprocess.run([sys.executable, "-m", "venv", d], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        fail(f"{sys.executable} -m venv {d} failed (exit {r.returncode}): "
             f"{tail(r.stdout, 5)} (on Debian/Ubuntu: the python3-venv package)")
    cmd = [py, "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
    env = dict(os.environ)
    if wheels != "-":  # the uploaded wheels only: no index, no pip configuration
        cmd += ["--no-index", "--find-links", wheels]
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
    cmd += ["{}=={}".format(*kv) for kv in sorted(pins.items())]
    log_path = os.path.join(d, ".rpg-pip.log")
    with open(log_path, "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    with open(log_path) as log:
        words = log.read()
    if r.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        fail(f"pip install of the agent's packages into {d} failed (exit {r.returncode}):\n"
             f"{tail(words)}")
    left = problems(py, top, pins)
    if left:
        shutil.rmtree(d, ignore_errors=True)
        fail("the environment {} was built but still lacks: {}".format(d, "; ".join(left)))
    with open(ready, "w") as fh:
        json.dump(pins, fh)
    with open(os.path.join(root, "env-builds.log"), "a") as fh:
        fh.write("{} {} built {} in {:.1f} s{}\n".format(
            time.strftime("%Y-%m-%dT%H:%M:%S"), socket.gethostname(), d, time.time() - t1,
            " after waiting" if waited else ""))
    found(f"built {d} in {time.time() - t1:.1f} s", py)


if __name__ == "__main__":
    main()
