"""The progress record (config.ProgressRecord): kept in memory, served at /progress, published at
most every progress_interval_seconds, and written to the termination log at exit.

Nothing here can fail training: every method catches everything.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from kubetune_contract.layout import MESSAGE_MAX_CHARS, TERMINATION_LOG_LIMIT
from kubetune_contract.progress import ProgressRecord


class Progress:
    def __init__(self, interval_seconds: float, clock=time.monotonic):
        self.interval = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict = {"phase": "starting"}
        self._published = ProgressRecord(phase="starting")
        self._last_publish: float | None = None
        self._start = clock()
        self.elapsed_offset = 0.0  # wall time of earlier attempts (restored from a checkpoint)

    def elapsed(self) -> float:
        return self.elapsed_offset + (self._clock() - self._start)

    def update(self, force: bool = False, **fields) -> None:
        """Merge fields; publish when the interval has passed (or force / phase change)."""
        try:
            with self._lock:
                phase_changed = "phase" in fields and fields["phase"] != self._pending.get("phase")
                self._pending.update(fields)
                now = self._clock()
                if force or phase_changed or self._last_publish is None or now - self._last_publish >= self.interval:
                    self._publish_locked(now)
        except Exception:
            pass

    def _publish_locked(self, now: float) -> None:
        data = dict(self._pending)
        data["elapsed_seconds"] = round(self.elapsed(), 3)
        msg = data.get("message")
        if isinstance(msg, str) and len(msg) > MESSAGE_MAX_CHARS:
            data["message"] = msg[: MESSAGE_MAX_CHARS - 3] + "..."
        rec = ProgressRecord.model_validate(data)
        self._published = rec
        self._last_publish = now

    def flush(self) -> None:
        self.update(force=True)

    def record(self) -> ProgressRecord:
        with self._lock:
            return self._published

    def as_json_dict(self) -> dict:
        try:
            return self.record().to_json_dict()
        except Exception:
            return {"phase": "starting"}

    def write_termination_log(self, path: str | Path) -> bool:
        """The final record, shortened to fit the kubelet's 4096-byte limit; False if not writable."""
        try:
            self.flush()
            rec = self.record()
            text = json.dumps(rec.to_json_dict(), separators=(",", ":"))
            if len(text.encode()) >= TERMINATION_LOG_LIMIT and rec.message:
                room = max(0, len(rec.message) - (len(text.encode()) - TERMINATION_LOG_LIMIT) - 64)
                rec = rec.model_copy(update={"message": rec.message[:room] + "..."})
                text = json.dumps(rec.to_json_dict(), separators=(",", ":"))
            if len(text.encode()) >= TERMINATION_LOG_LIMIT:
                return False
            with open(path, "w") as f:
                f.write(text)
            return True
        except Exception:
            return False
