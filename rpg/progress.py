"""Progress bars of the command line (``rpg run``, ``rpg hist``): rich's bar on a terminal,
plain lines (at most one a second, and the last one) when stderr is a file or a pipe. No
thread: the bar is redrawn when it is updated (rich's auto-refresh thread is off).
"""

from __future__ import annotations

import sys
import time
from typing import Any


class ProgressBar:
    def __init__(self, total: float, label: str, stream: Any = None) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self._last_line = 0.0
        self._bar: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[text]}"),
                                 console=Console(file=self.stream), auto_refresh=False)
            self._task = self._bar.add_task(label, total=total, text="")
            self._bar.start()

    def plain(self, completed: float, text: str) -> str:
        return (f"{self.label} {completed:g}/{self.total:g} "
                f"{time.monotonic() - self.t0:6.1f}s  {text}").rstrip()

    def update(self, completed: float, text: str = "", force: bool = False) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, text=text)
            self._bar.refresh()
        elif force or time.monotonic() - self._last_line >= 1.0:
            self.stream.write(self.plain(completed, text) + "\n")
            self.stream.flush()
            self._last_line = time.monotonic()

    def done(self, completed: float, text: str = "") -> None:
        self.update(completed, text, force=True)
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
