"""Goodput facts of one attempt, for the operator to combine into a job's goodput.

- productive seconds: wall time inside optimizer steps that advanced the global step past the
  highest step any attempt had reached (first-time progress);
- recomputed steps (and their wall time, recomputed seconds): steps trained again because the
  attempt resumed from a checkpoint older than that highest step (a kill without SIGTERM, a node
  lost: the steps after the last checkpoint are done twice);
- startup seconds: process start to the first step (S3 checks, model and data loading, restore);
- checkpoint-blocked seconds: training time spent in checkpoint saves (local write + staging).

The highest step reached travels two ways: in the checkpoint (`TrainState.highest_step`), and in
a small high-water mark object next to the checkpoints, `<job prefix>/highest-step.json` (the
prefix has the job's UID: one mark per incarnation, never an old job's), that rank 0 rewrites in
the background at most every progress interval. Only the second survives a kill between
checkpoints. Nothing here can fail training: S3 errors are logged once and ignored.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import logs

MARK_FILE = "highest-step.json"


def process_start_monotonic() -> float:
    """This process's start on the monotonic clock (psutil's create time), else now."""
    try:
        import psutil

        age = time.time() - psutil.Process().create_time()
        return time.monotonic() - max(0.0, age)
    except Exception:
        return time.monotonic()


class HighWaterMark:
    """`<prefix>/highest-step.json` ({"step": n}): read at resume, rewritten by rank 0 when the
    step grew and `interval` seconds have passed since the last write (one PUT at most)."""

    def __init__(self, client: Any, prefix_uri: str, interval: float, clock: Any = time.monotonic) -> None:
        from . import s3

        self.client, self.interval, self._clock = client, interval, clock
        self.uri = s3.parse_s3_uri(prefix_uri, field="checkpoints.uri").join(MARK_FILE)
        self._written = -1
        self._last: float | None = None
        self._pending: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._warned = False
        self._lock = threading.Lock()

    def read(self) -> int:
        """The step recorded, 0 when there is none (or it cannot be read)."""
        from . import s3

        try:
            return max(0, int(json.loads(s3.get_bytes(self.client, self.uri))["step"]))
        except s3.S3NotFound:
            return 0
        except Exception as e:
            self._warn("read", e)
            return 0

    def note(self, step: int, force: bool = False) -> None:
        """The step reached; written in the background when due (never blocks, never raises)."""
        with self._lock:
            now = self._clock()
            due = force or self._last is None or now - self._last >= self.interval
            busy = self._pending is not None and not self._pending.done()
            if step <= self._written or not due or busy:
                return
            self._last, self._written = now, step
            try:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-highwater")
                self._pending = self._pool.submit(self._write, step)
            except Exception as e:  # e.g. at interpreter shutdown
                self._warn("write", e)

    def _write(self, step: int) -> None:
        from . import s3

        try:
            s3.put_bytes(self.client, self.uri, json.dumps({"step": step}).encode())
        except Exception as e:
            self._warn("write", e)

    def _warn(self, op: str, e: Exception) -> None:
        if not self._warned:
            self._warned = True
            error = f"{type(e).__name__}: {e}"
            logs.log("highwater_mark_unavailable", "warning", op=op, uri=str(self.uri), error=error)

    def close(self, step: int | None = None, timeout: float = 10.0) -> None:
        """Write the last step (if it grew) and wait up to timeout for it: an attempt that dies
        of an error leaves its highest step for the next one."""
        try:
            if self._pending is not None:
                self._pending.result(timeout=timeout)
            if step is not None:
                self.note(step, force=True)
            if self._pending is not None:
                self._pending.result(timeout=timeout)
        except Exception:
            pass
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None  # (a later note starts another)


class Goodput:
    """This attempt's facts (see the module docstring), mirrored into the trainer's metrics."""

    def __init__(self, metrics: Any, started: float | None = None) -> None:
        self.metrics = metrics
        self.started = started if started is not None else process_start_monotonic()
        self.highest_before = 0  # the highest step an earlier attempt reached
        self.productive_seconds = 0.0
        self.recomputed_steps = 0
        self.recomputed_seconds = 0.0
        self.startup_seconds: float | None = None
        self.checkpoint_blocked_seconds = 0.0
        self.highwater: HighWaterMark | None = None  # rank 0 only

    def watch_highwater(self, client: Any, prefix_uri: str, interval: float) -> None:
        """Rank 0 keeps the highest step reached in S3, beyond what the checkpoint knows."""
        self.highwater = HighWaterMark(client, prefix_uri, interval)

    def resume_from(self, state_highest: int, global_step: int) -> int:
        """The highest step any attempt reached (checkpoint state, S3 marker, this step); steps up to it
        are recomputed when trained again."""
        highest = max(state_highest, global_step, self.highwater.read() if self.highwater else 0)
        self.resumed(highest)
        return highest

    def resumed(self, highest_before: int) -> None:
        self.highest_before = max(0, highest_before)

    def close(self, step: int) -> None:
        if self.highwater is not None:
            self.highwater.close(step)

    def training_starts(self, now: float | None = None) -> None:
        """The first step begins: the startup is over."""
        if self.startup_seconds is None:
            self.startup_seconds = max(0.0, (now if now is not None else time.monotonic()) - self.started)
            m, s = self.metrics, self.startup_seconds
            m.safe(lambda: m.known(m.startup_seconds, s))

    def step_done(self, step: int, seconds: float) -> None:
        m = self.metrics
        if step <= self.highest_before:
            self.recomputed_steps += 1
            self.recomputed_seconds += seconds
            m.safe(lambda: m.recomputed_steps.inc())
            m.safe(lambda: m.recomputed_seconds.inc(seconds))
        else:
            self.productive_seconds += seconds
            m.safe(lambda: m.productive_seconds.inc(seconds))
        m.safe(lambda: m.step_seconds.observe(seconds))
        if self.highwater is not None:
            self.highwater.note(step)

    def checkpoint_blocked(self, seconds: float) -> None:
        self.checkpoint_blocked_seconds += seconds
        m = self.metrics
        m.safe(lambda: m.checkpoint_blocked_seconds.inc(seconds))

    def progress_fields(self) -> dict[str, Any]:
        """The facts as ProgressRecord fields."""
        out: dict[str, Any] = {
            "productive_seconds": round(self.productive_seconds, 3),
            "recomputed_steps": self.recomputed_steps,
            "recomputed_seconds": round(self.recomputed_seconds, 3),
            "checkpoint_blocked_seconds": round(self.checkpoint_blocked_seconds, 3),
        }
        if self.startup_seconds is not None:
            out["startup_seconds"] = round(self.startup_seconds, 3)
        return out


def job_card(job_cost: str | None, goodput: Goodput, tokens: int, now: float | None = None) -> dict[str, Any]:
    """The model card's `goodput` and `cost` sections: the job's totals as of the export, i.e. the
    earlier attempts' (KUBETUNE_JOB_COST, from the operator's status.cost when this pod was created)
    plus this attempt up to now (rank 0's facts times the workers; its worker time from process
    start, priced at the operator's USD per worker-hour). Without the variable (outside a pod):
    this attempt alone, and no USD."""
    from kubetune_contract.jobcost import JobCostSoFar

    prior = JobCostSoFar()
    if job_cost:
        try:
            prior = JobCostSoFar.model_validate_json(job_cost)
        except ValueError as e:
            logs.log("job_cost_unreadable", "warning", error=str(e)[:300])
    w = prior.workers
    own = max(0.0, (now if now is not None else time.monotonic()) - goodput.started) * w
    startup = (goodput.startup_seconds or 0.0) * w
    g = prior.goodput
    seconds = {
        "productive_seconds": g.productive_seconds + goodput.productive_seconds * w,
        "startup_seconds": g.startup_seconds + (0.0 if prior.after_preemption else startup),
        "checkpoint_blocked_seconds": g.checkpoint_blocked_seconds + goodput.checkpoint_blocked_seconds * w,
        "lost_to_preemption_seconds": g.lost_to_preemption_seconds
        + goodput.recomputed_seconds * w
        + (startup if prior.after_preemption else 0.0),
    }
    worker = prior.worker_seconds + own
    priced = prior.usd_per_worker_hour is not None
    usd = prior.estimated_usd + own / 3600 * (prior.usd_per_worker_hour or 0.0) if priced else None
    per_second = usd / worker if usd is not None and worker > 0 else None
    tokens = max(tokens, prior.tokens)
    out_goodput: dict[str, Any] = {
        "as_of": "export",
        **{k: round(v, 3) for k, v in seconds.items()},
        "other_seconds": round(max(0.0, worker - sum(seconds.values())), 3),
        "pending_seconds": round(g.pending_seconds, 3),
        "ratio": round(min(1.0, seconds["productive_seconds"] / worker), 4) if worker > 0 else 0.0,
        "productive_usd": None if per_second is None else round(seconds["productive_seconds"] * per_second, 6),
        "lost_to_preemption_usd": None
        if per_second is None
        else round(seconds["lost_to_preemption_seconds"] * per_second, 6),
    }
    cost = {
        "as_of": "export",
        "attempts": prior.attempt + 1,
        "worker_seconds": round(worker, 3),
        "estimated_usd": None if usd is None else round(usd, 6),
        "tokens": tokens,
        "usd_per_million_tokens": round(usd / tokens * 1e6, 4) if usd is not None and tokens else None,
        "note": "as of export: the operator's status.cost also counts the upload and exit after it",
    }
    return {"goodput": out_goodput, "cost": cost}
