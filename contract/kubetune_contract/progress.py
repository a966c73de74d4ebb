"""What the trainer tells the operator: its exit code and its progress record (GET /progress on
layout.METRICS_PORT while it runs, and the termination message at exit)."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import Field

from .config import SpecModel
from .layout import MESSAGE_MAX_CHARS


class ExitCode(enum.IntEnum):
    """How a trainer process ends; the operator decides retries from these."""

    SUCCESS = 0
    RETRIABLE = 1  # infrastructure failure (network, S3 5xx, OOM-kill shows as 137): retry
    USER_ERROR = 2  # bad config or data, missing bucket, bad credentials: do not retry
    PREEMPTED = 3  # SIGTERM received and a checkpoint was made durable: resume elsewhere


class CheckpointRef(SpecModel):
    uri: str
    step: int
    time: str  # RFC 3339


class ProgressRecord(SpecModel):
    """What the trainer reports (GET /progress, and the termination message at exit)."""

    phase: Literal["starting", "preflight", "loading", "training", "checkpointing", "uploading", "done", "failed"]
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    tokens_seen: int = 0
    resumed_from_step: int | None = None
    last_checkpoint: CheckpointRef | None = None
    output_uri: str | None = None
    message: str | None = Field(None, max_length=MESSAGE_MAX_CHARS, description="Why it failed, for user errors.")
    elapsed_seconds: float = 0.0
    steps_per_second: float | None = None
    # Goodput facts of this attempt (this process), for the operator to combine per job; absent
    # from trainers that predate them. Metrics of the same name: docs/metrics.md.
    productive_seconds: float | None = Field(
        None, ge=0, description="Wall time in optimizer steps that advanced the global step for the first time."
    )
    recomputed_steps: int | None = Field(
        None, ge=0, description="Steps trained again: resumed from a checkpoint older than the highest step reached."
    )
    recomputed_seconds: float | None = Field(
        None, ge=0, description="Wall time of the recomputed steps (in optimizer steps, like productive_seconds)."
    )
    startup_seconds: float | None = Field(None, ge=0, description="Process start to the first optimizer step.")
    checkpoint_blocked_seconds: float | None = Field(
        None, ge=0, description="Training time spent in checkpoint saves (local write and staging)."
    )
    mfu: float | None = Field(
        None, ge=0, description="Model FLOPs utilization over the last logging window; absent without a known GPU."
    )

    @property
    def progress_percentage(self) -> int | None:
        if not self.total_steps:
            return None
        return max(0, min(100, int(100 * self.step / self.total_steps)))

    @property
    def estimated_remaining_seconds(self) -> int | None:
        if not self.total_steps or not self.steps_per_second:
            return None
        return max(0, int((self.total_steps - self.step) / self.steps_per_second))
