"""The relay on a SLURM login node (``slurm+ssh://``): compute nodes cannot reach the login
node's 127.0.0.1, where sshd listens for the hub's reverse forward, so this listens on an
address they can reach and passes every connection on to that forward.

Standard library only (Python 3.8+): the SLURM launcher uploads this file into the pilot
sandbox and runs it detached with the login node's python::

    python relay.py LISTEN_HOST FORWARD_PORT SANDBOX [LISTEN_PORT]

LISTEN_HOST ``auto`` is the address the login node's own name resolves to (what compute nodes
usually reach it by). LISTEN_PORT (default 0: any) is for a restart: the agent's config names
the first relay's port.
It writes the port it listens on to ``SANDBOX/relay.port`` (through a rename: whole or not at
all) and ends when its sandbox is removed (the pilot stopped), on SIGTERM, or when it has had
no connection for ``IDLE_S`` after having had one (the agent is gone). One thread per
direction per connection; the agent opens a few.
"""

import os
import select
import signal
import socket
import sys
import threading
import time

IDLE_S = 600.0
CHECK_S = 1.0
CHUNK = 64 * 1024


def pump(a, b, done):
    try:
        while True:
            data = a.recv(CHUNK)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        a.close()  # each socket is the source of one thread: closed once, by it
        done()


def main(argv):
    listen_host, forward_port, sandbox = argv[1], int(argv[2]), argv[3]
    listen_port = int(argv[4]) if len(argv) > 4 else 0
    if listen_host == "auto":  # the address this node's own name resolves to
        try:
            listen_host = socket.gethostbyname(socket.getfqdn())
        except OSError:
            listen_host = socket.gethostbyname(socket.gethostname())
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((listen_host, listen_port))
    srv.listen(64)
    port_file = os.path.join(sandbox, "relay.port")
    with open(port_file + ".tmp", "w") as fh:
        fh.write(f"{listen_host} {srv.getsockname()[1]}\n")
    os.rename(port_file + ".tmp", port_file)
    lock = threading.Lock()
    state = {"open": 0, "last": None}

    def closed_one():
        with lock:
            state["open"] -= 1
            state["last"] = time.monotonic()

    while os.path.isdir(sandbox):
        ready, _, _ = select.select([srv], [], [], CHECK_S)
        if not ready:
            with lock:
                idle = state["open"] == 0 and state["last"] is not None and \
                    time.monotonic() - state["last"] > IDLE_S
            if idle:
                break
            continue
        conn, _addr = srv.accept()
        try:
            up = socket.create_connection(("127.0.0.1", forward_port), timeout=10)
        except OSError as exc:
            sys.stderr.write(f"relay: the forward on 127.0.0.1:{forward_port} refused: {exc}\n")
            sys.stderr.flush()
            conn.close()
            continue
        up.settimeout(None)
        with lock:
            state["open"] += 2
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=pump, args=(a, b, closed_one), daemon=True).start()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
