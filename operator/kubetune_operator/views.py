"""What a reconcile pass sees: the few facts of pods, nodes and the job that `decide` consumes.

`observe` builds these from the Kubernetes objects; `decide` and `cost` only read them. Frozen
dataclasses with no behaviour beyond `current_attempt`, the one derived fact both sides need.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetune_contract.progress import ProgressRecord

from . import api


@dataclass(frozen=True)
class PodView:
    """What the decision needs to know of one worker pod."""

    name: str
    attempt: int
    rank: int
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    deleting: bool = False
    node: str | None = None
    ip: str | None = None
    exit_code: int | None = None
    reason: str | None = None  # container terminated reason, else pod.status.reason
    message: str | None = None  # termination message (the trainer's final ProgressRecord) or pod message
    disruption: str | None = None  # DisruptionTarget condition reason
    unschedulable: str | None = None  # PodScheduled=False message
    waiting_reason: str | None = None
    waiting_message: str | None = None
    created_at: dt.datetime | None = None  # the pod's creation (pending time runs from here)
    started_at: dt.datetime | None = None  # the trainer container's start (cost accrues from here)
    finished_at: dt.datetime | None = None  # ... and its end
    role: str = "worker"  # "worker" | "sizing" (the pre-GPU sizing pod, render.sizing_pod)


@dataclass(frozen=True)
class NodeView:
    name: str
    capacity_type: str  # "spot" | "on-demand"
    gpu_type: str | None = None


# USD per hour for one worker on a node (None: not known) with the job's resources; see cost.price_per_hour.
GpuPrice = Callable[[NodeView | None, api.ResourcesSpec], float]


@dataclass(frozen=True)
class Observed:
    """One job as observed at `now`: everything `decide` may look at."""

    job: dict[str, Any]  # metadata + status as read
    spec: api.FineTuneJobSpec | None
    now: dt.datetime
    pods: tuple[PodView, ...] = ()
    nodes: dict[str, NodeView] = field(default_factory=dict)
    spec_error: str | None = None  # spec that passed the schema but not the models (version skew)
    preflight_problem: tuple[str, str] | None = None  # (reason, message): missing Secret, unreachable S3
    gpu_type_known: bool | None = None  # None: not checked
    progress: ProgressRecord | None = None  # polled from the running rank 0
    gpu_price: GpuPrice | None = None
    sizing_pods: tuple[PodView, ...] = ()  # the job's sizing pods (not in `pods`, which are its workers)
    gpu_hour_prices: tuple[float, float] | None = None  # (low, high) USD per GPU-hour for status.estimate


def current_attempt(status: dict[str, Any], pods: tuple[PodView, ...]) -> int:
    """The status's attempt, or a newer one whose pods exist (a status write that was lost)."""
    return max([status.get("attempt") or 0, *(p.attempt for p in pods)])
