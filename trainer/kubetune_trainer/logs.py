"""Structured logs: one JSON object per line on stdout, one line per event.

Every line carries time, level, event and rank; progress events are emitted by rank 0 only (the
caller uses `rank0`). Progress bars of tqdm / transformers / huggingface_hub are switched off when
stdout is not a terminal (and always in the container), so no carriage-return noise reaches logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
import traceback
from datetime import UTC, datetime

_lock = threading.Lock()
_rank = 0


def set_rank(rank: int) -> None:
    global _rank
    _rank = rank


def _clean(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return str(v)


def log(event: str, level: str = "info", **fields) -> None:
    rec = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "level": level, "event": event, "rank": _rank}
    rec.update({k: _clean(v) for k, v in fields.items()})
    line = json.dumps(rec, separators=(",", ":"))
    with _lock:
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except Exception:  # a closed stdout must never stop training
            pass


def rank0(event: str, level: str = "info", **fields) -> None:
    if _rank == 0:
        log(event, level, **fields)


def disable_progress_bars() -> None:
    """No tqdm bars anywhere (set before transformers/hub are imported, and after)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    for cat in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=cat)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars as _hub_off

        _hub_off()
    except Exception:
        pass


def monotonic() -> float:
    return time.monotonic()


class _JsonHandler(logging.Handler):
    """Routes stdlib `logging` records (S3/checkpoint modules, libraries) into our JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info:
                fields["traceback"] = "".join(traceback.format_exception(*record.exc_info))[-2000:]
            log("log", record.levelname.lower(), **fields)
        except Exception:
            pass


def capture_stdlib_logging() -> None:
    """kubetune_trainer.* at INFO, everything else at WARNING, all as JSON lines on stdout."""
    root = logging.getLogger()
    if any(isinstance(h, _JsonHandler) for h in root.handlers):
        return
    root.addHandler(_JsonHandler())
    root.setLevel(logging.WARNING)
    logging.getLogger("kubetune_trainer").setLevel(logging.INFO)
