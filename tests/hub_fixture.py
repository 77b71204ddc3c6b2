"""A real ``rpg hub serve`` process for the tests of the hub service (and its access files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psutil


class HubProcess:
    """``rpg hub serve --sandbox DIR`` as a child process; ``stop()`` SIGTERMs and reaps it."""

    def __init__(self, sandbox: str, *extra: str) -> None:
        self.sandbox = sandbox
        self.access_path = os.path.join(sandbox, "access.json")
        self.log_path = sandbox + ".log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rpg.cli", "hub", "serve", "--sandbox", sandbox, *extra],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while b"listening on" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rpg hub serve did not start: {self.log().decode()}")
            time.sleep(0.05)
        with open(self.access_path) as fh:
            self.access: dict[str, Any] = json.load(fh)

    def log(self) -> bytes:
        with open(self.log_path, "rb") as fh:
            return fh.read()

    def token_for(self, name: str) -> str:
        """``rpg hub token`` for user ``name``: the path of their access file."""
        out = subprocess.run([sys.executable, "-m", "rpg.cli", "hub", "token", "--sandbox",
                              self.sandbox, name], capture_output=True, text=True, timeout=30,
                             check=True).stdout
        path = os.path.join(os.path.dirname(self.sandbox), f"{name}.access.json")
        with open(path, "w") as fh:
            fh.write(out)
        return path

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait(10)
        self._log.close()
        return rc
