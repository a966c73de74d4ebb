"""A job's goodput: the trainer's per-attempt facts combined across attempts into status.cost. Pure.

Each attempt's rank 0 reports its own facts (kubetune_contract.progress.ProgressRecord: productive,
recomputed, start-up and checkpoint-blocked seconds), polled from /progress and in its termination
message. `status.cost.ledger` keeps the totals of the attempts already folded (`finished`, in
worker-seconds) and the latest facts of one attempt (`attempt`, `facts`, in rank 0's seconds): a
later attempt's first report folds it. So an attempt that vanished without a final record keeps its
last polled facts, and an operator restart re-reads the same status and adds nothing twice (facts
of one attempt only grow: each field keeps its maximum).

The categories (worker-seconds: rank 0's seconds times the attempt's workers):
- productive: steps that advanced the job's highest step;
- lostToPreemption: recomputed steps (trained again after a resume), plus the whole start-up of an
  attempt that began after a preemption (restart overhead);
- startup: the start-up of the first attempt and of attempts after any other restart;
- checkpointBlocked: time in checkpoint saves;
- other: workerSeconds minus those four (evaluation, export, the SIGTERM tail), never < 0;
- pending (cost.accrue): pod creation to container start, not part of the paid time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from kubetune_contract.jobcost import GoodputSeconds, JobCostSoFar
from kubetune_contract.progress import ProgressRecord

from .api import FineTuneJobSpec
from .views import GpuPrice, NodeView, PodView

CATEGORIES = ("productiveSeconds", "startupSeconds", "checkpointBlockedSeconds", "lostToPreemptionSeconds")
FACTS = {
    "productiveSeconds": "productive_seconds",
    "recomputedSeconds": "recomputed_seconds",
    "startupSeconds": "startup_seconds",
    "checkpointBlockedSeconds": "checkpoint_blocked_seconds",
}


def rank0_records(
    pods: Iterable[PodView], polled: ProgressRecord | None, attempt: int
) -> list[tuple[int, ProgressRecord]]:
    """(attempt, record) of every rank-0 record at hand: termination messages of rank-0 pods of any
    attempt, and the polled record of the current attempt's rank 0; oldest attempt first."""
    out = []
    for pod in pods:
        if pod.rank == 0 and pod.message:
            try:
                out.append((pod.attempt, ProgressRecord.model_validate_json(pod.message)))
            except ValueError:
                pass
    if polled is not None:
        out.append((attempt, polled))
    return sorted(out, key=lambda ar: ar[0])


def facts_of(record: ProgressRecord) -> dict[str, float] | None:
    """The goodput facts of a record, None for a trainer that predates them."""
    values = {key: getattr(record, attr) for key, attr in FACTS.items()}
    if all(v is None for v in values.values()):
        return None
    return {k: float(v or 0.0) for k, v in values.items()}


def contribution(ledger: dict[str, Any]) -> dict[str, float]:
    """What the ledger's current attempt adds to each category, in worker-seconds."""
    f, workers = ledger.get("facts") or {}, int(ledger.get("workers") or 1)
    after = bool(ledger.get("afterPreemption"))
    startup = float(f.get("startupSeconds", 0.0))
    return {
        "productiveSeconds": workers * float(f.get("productiveSeconds", 0.0)),
        "startupSeconds": 0.0 if after else workers * startup,
        "checkpointBlockedSeconds": workers * float(f.get("checkpointBlockedSeconds", 0.0)),
        "lostToPreemptionSeconds": workers * (float(f.get("recomputedSeconds", 0.0)) + (startup if after else 0.0)),
    }


def note(
    ledger: dict[str, Any] | None, attempt: int, facts: dict[str, float], workers: int, preempted_before: bool
) -> dict[str, Any]:
    """The ledger after a record of `attempt` with `facts`. A record of an attempt already folded
    changes nothing; one of a later attempt folds the current one first. `preempted_before`: what
    to assume about the attempt before `attempt` when the ledger never saw it end (an older status)."""
    led = copy.deepcopy(ledger or {})
    current = led.get("attempt")
    if current is not None and attempt < current:
        return led
    if current is None or attempt > current:
        if current is not None:
            finished = led.setdefault("finished", {})
            for key, value in contribution(led).items():
                finished[key] = round(float(finished.get(key, 0.0)) + value, 3)
        if led.get("lastEnded") is not None:
            after = led["lastEnded"] == attempt - 1 and bool(led.get("lastEndedByPreemption"))
        else:
            after = attempt > 0 and preempted_before
        led.update(attempt=attempt, workers=workers, afterPreemption=after, facts={})
    old = led.get("facts") or {}
    led["facts"] = {k: round(max(float(old.get(k, 0.0)), facts.get(k, 0.0)), 3) for k in FACTS}
    return led


def attempt_ended(ledger: dict[str, Any] | None, attempt: int, preempted: bool) -> dict[str, Any]:
    """Record how `attempt` ended: the start-up of the next one counts as lost when a preemption did."""
    led = copy.deepcopy(ledger or {})
    led.update(lastEnded=attempt, lastEndedByPreemption=preempted)
    return led


def totals(ledger: dict[str, Any] | None) -> dict[str, float]:
    """Worker-seconds per trainer-fed category: the finished attempts plus the current one."""
    led = ledger or {}
    finished = led.get("finished") or {}
    now = contribution(led) if led.get("attempt") is not None else dict.fromkeys(CATEGORIES, 0.0)
    return {k: float(finished.get(k, 0.0)) + now[k] for k in CATEGORIES}


def summarize(cost: dict[str, Any]) -> dict[str, Any]:
    """cost with goodput, usdPerMillionTokens computed from workerSeconds, estimatedUsd, tokens and
    the ledger. A category never drops below what the status showed (counters)."""
    out = dict(cost)
    old = dict(cost.get("goodput") or {})
    worker = float(cost.get("workerSeconds", 0.0))
    usd = float(cost.get("estimatedUsd", "0") or 0)
    g: dict[str, Any] = {k: round(max(float(old.get(k, 0.0)), v), 3) for k, v in totals(cost.get("ledger")).items()}
    g["otherSeconds"] = round(max(0.0, worker - sum(g[k] for k in CATEGORIES)), 3)
    g["pendingSeconds"] = float(old.get("pendingSeconds", 0.0))
    g["ratio"] = round(min(1.0, g["productiveSeconds"] / worker), 4) if worker > 0 else 0.0
    per_second = usd / worker if worker > 0 else 0.0
    g["productiveUsd"] = f"{g['productiveSeconds'] * per_second:.6f}"
    g["lostToPreemptionUsd"] = f"{g['lostToPreemptionSeconds'] * per_second:.6f}"
    out["goodput"] = g
    tokens = int(cost.get("tokens") or 0)
    if tokens > 0:
        out["usdPerMillionTokens"] = f"{usd / tokens * 1e6:.4f}"
    return out


def observe_records(
    cost: dict[str, Any] | None,
    records: list[tuple[int, ProgressRecord]],
    workers: int,
    preempted_before: bool,
) -> dict[str, Any]:
    """cost with every record's facts noted in the ledger and its tokens counted."""
    out = dict(cost or {})
    led = out.get("ledger")
    tokens = int(out.get("tokens") or 0)
    for attempt, record in records:
        tokens = max(tokens, record.tokens_seen)
        facts = facts_of(record)
        if facts is not None:
            led = note(led, attempt, facts, workers, preempted_before)
    if led is not None:
        out["ledger"] = led
    out["tokens"] = tokens
    return out


def so_far(cost: dict[str, Any] | None, attempt: int, workers: int, usd_per_worker_hour: float | None) -> JobCostSoFar:
    """The job's totals before `attempt` (for its pods' KUBETUNE_JOB_COST): a pod is created before
    it reports, so the status holds only earlier attempts' facts."""
    c = cost or {}
    led = c.get("ledger") or {}
    seconds = totals(led) if (led.get("attempt") is None or led["attempt"] < attempt) else led.get("finished") or {}
    after = led.get("lastEnded") == attempt - 1 and bool(led.get("lastEndedByPreemption"))
    return JobCostSoFar(
        attempt=attempt,
        workers=workers,
        after_preemption=after,
        usd_per_worker_hour=usd_per_worker_hour,
        worker_seconds=float(c.get("workerSeconds", 0.0)),
        estimated_usd=float(c.get("estimatedUsd", "0") or 0),
        tokens=int(c.get("tokens") or 0),
        goodput=GoodputSeconds(
            productive_seconds=float(seconds.get("productiveSeconds", 0.0)),
            startup_seconds=float(seconds.get("startupSeconds", 0.0)),
            checkpoint_blocked_seconds=float(seconds.get("checkpointBlockedSeconds", 0.0)),
            lost_to_preemption_seconds=float(seconds.get("lostToPreemptionSeconds", 0.0)),
            pending_seconds=float((c.get("goodput") or {}).get("pendingSeconds", 0.0)),
        ),
    )


def job_cost_env(
    cost: dict[str, Any] | None, spec: FineTuneJobSpec, attempt: int, on_demand: bool, price: GpuPrice | None
) -> str:
    """KUBETUNE_JOB_COST of `attempt`'s pods: the totals so far, and the price of one worker where
    the pod is meant to go (its node is not known yet: spot unless the policy or a fallback says
    on-demand)."""
    usd_per_hour = None
    if price is not None:
        capacity = "on-demand" if on_demand or spec.capacity.policy == "on-demand" else "spot"
        usd_per_hour = round(price(NodeView("", capacity, spec.resources.gpu_type), spec.resources), 6)
    return so_far(cost, attempt, spec.resources.workers, usd_per_hour).model_dump_json(by_alias=True)
