"""SIGTERM/SIGINT: the handler only sets a flag; the step loop reads it at step boundaries (and
the phases before training check it between phases)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any

from . import logs


class Preempted(Exception):
    """Stop requested before any training step of this attempt: nothing new to save."""


class StopFlag:
    """Set by SIGTERM/SIGINT (once installed) or by `set`; true once set."""

    def __init__(self) -> None:
        self._ev = threading.Event()
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def set(self, name: str = "manual") -> None:
        if not self._ev.is_set():
            self.signal = name
            self._ev.set()

    def __bool__(self) -> bool:
        return self._ev.is_set()

    def raise_if_set(self) -> None:
        """Between the phases before training: a stop then means there is nothing to save."""
        if self:
            raise Preempted()

    def install(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            first = not self._ev.is_set()
            self.set(signal.Signals(signum).name)
            if first:
                logs.log(
                    "signal_received",
                    "warning",
                    signal=signal.Signals(signum).name,
                    action="finish the current step, checkpoint, exit",
                )

        self._previous = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, handler)

    def uninstall(self) -> None:
        """Give the previous handlers back (matters when run in-process, e.g. in tests)."""
        for s, h in self._previous.items():
            with contextlib.suppress(Exception):
                signal.signal(s, h)
        self._previous = {}
