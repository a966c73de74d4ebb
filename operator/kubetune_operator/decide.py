"""The reconcile decision: observed state in (views.Observed), actions out (Decision). Pure; no I/O,
no clock reads. observe.py reads, act.py writes.

One FineTuneJob runs as a sequence of *attempts*; each attempt is a set of worker pods named
`<job>-a<attempt>-w<rank>`. An attempt ends in success, a preemption (the next attempt resumes
from the last checkpoint), a user error (the job fails, no retry) or an infrastructure failure
(retried up to runPolicy.backoffLimit). The attempt counter and the preemption/restart counters
move together in one status write, before any pod of the next attempt is created, so a restart
of the operator at any point neither double-counts nor duplicates pods.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from kubetune_contract.progress import ExitCode

from . import budget, decide_sizing, goodput
from .cost import accrue
from .jobstatus import (
    STATUS_KEYS,
    Event,
    apply_progress,
    condition,
    final_record,
    set_condition,
    trainer_message,
)
from .render import pod_name
from .timeutil import parse_time, rfc3339
from .views import Observed, PodView, current_attempt

Outcome = Literal["pending", "running", "succeeded", "preempted", "user_error", "failed"]

# pod.status.reason values the kubelet/controllers use when a pod is killed for reasons outside
# the trainer: all mean "the node went away or reclaimed its resources", i.e. a preemption.
PREEMPTION_POD_REASONS = {
    "Evicted",
    "Preempting",
    "NodeShutdown",
    "Terminated",
    "NodeLost",
    "Shutdown",
    "DeletionByPodGC",
}
# DisruptionTarget condition reasons (Kubernetes >= 1.26) that a spot reclaim or drain produces.
WAITING_PROBLEMS = {
    "ErrImagePull": "ImagePullFailed",
    "ImagePullBackOff": "ImagePullFailed",
    "InvalidImageName": "InvalidImage",
    "CreateContainerConfigError": "ContainerConfigError",
    "CreateContainerError": "ContainerConfigError",
}
PERMANENT_WAITING = {"InvalidImage"}
COST_STEP_SECONDS = 60.0
PREFLIGHT_PASSED = "pass-through fields allowed; S3 endpoint reachable"


@dataclass
class Decision:
    """What one pass should do; act.act carries it out (the status write first)."""

    status: dict[str, Any]
    ensure_config: bool = False
    create_pods: list[tuple[int, int]] = field(default_factory=list)  # (attempt, rank)
    master_addr: str = ""
    on_demand: bool = False
    delete_pods: list[str] = field(default_factory=list)
    delete_job: bool = False
    events: list[Event] = field(default_factory=list)
    job_cost: str | None = None  # the new pods' KUBETUNE_JOB_COST (JSON): the earlier attempts' totals
    create_sizing_pod: str | None = None  # the sizing pod to create (decide_sizing), after the ConfigMap
    keep_sizing_pod: str | None = None  # the sizing pod still awaited; decide() deletes every other one


def classify(pod: PodView) -> Outcome:
    """Why a worker pod is where it is. Deletion we did not ask for counts as a preemption:
    the operator only deletes pods of attempts it has already ended."""
    if pod.phase == "Succeeded":
        return "succeeded"
    if pod.exit_code == ExitCode.PREEMPTED or pod.disruption or pod.deleting:
        return "preempted"
    if pod.phase == "Failed":
        if pod.reason in PREEMPTION_POD_REASONS:
            return "preempted"
        if pod.exit_code == ExitCode.USER_ERROR:
            return "user_error"
        return "failed"
    if pod.phase == "Running":
        return "running"
    return "pending"


def _finish(
    st: dict[str, Any], obs: Observed, d: Decision, ok: bool, reason: str, message: str, alive: list[PodView]
) -> None:
    gen = obs.job["metadata"].get("generation")
    st["phase"] = "Succeeded" if ok else "Failed"
    st["message"] = message
    st["completionTime"] = rfc3339(obs.now)
    set_condition(st, "Succeeded" if ok else "Failed", True, reason, message, obs.now, gen)
    set_condition(st, "Running", False, reason, message, obs.now, gen)
    d.delete_pods += [p.name for p in alive if not p.deleting]
    d.events.append(Event("Normal" if ok else "Warning", reason, message))


def _end_attempt(
    st: dict[str, Any], obs: Observed, d: Decision, attempt: int, alive: list[PodView], preempted: bool = False
) -> Decision:
    """Close this attempt in status. When none of its pods still runs (their final checkpoint is
    durable), start the next attempt in the same decision: recovery must not wait for a timer."""
    st["cost"] = {
        **(st.get("cost") or {}),
        "ledger": goodput.attempt_ended((st.get("cost") or {}).get("ledger"), attempt, preempted),
    }
    st["attempt"] = attempt + 1
    st["phase"] = "Restarting"
    st.pop("workers", None)
    d.delete_pods += [p.name for p in alive if not p.deleting]
    if alive or obs.spec is None or obs.spec.run_policy.suspend:
        st["message"] = f"waiting for {len(alive)} pod(s) of attempt {attempt} to stop (final checkpoint)"
        return d
    return _start_attempt(st, obs, d, attempt + 1, [])


def decide(obs: Observed) -> Decision:
    d = _decide(obs)
    # A sizing pod is deleted once read, or when its job moved on (finished, suspended, spec changed).
    d.delete_pods += [p.name for p in obs.sizing_pods if p.name != d.keep_sizing_pod and not p.deleting]
    if d.status.get("cost"):
        d.status["cost"] = goodput.summarize(d.status["cost"])
    if d.create_pods and obs.spec is not None:
        d.job_cost = goodput.job_cost_env(
            d.status.get("cost"), obs.spec, d.create_pods[0][0], d.on_demand, obs.gpu_price
        )
    return d


def _decide(obs: Observed) -> Decision:
    meta = obs.job["metadata"]
    gen = meta.get("generation")
    st: dict[str, Any] = copy.deepcopy(obs.job.get("status") or {})
    for key in [k for k in st if k not in STATUS_KEYS]:
        st.pop(key)  # kopf's bookkeeping and anything undeclared: never write it back
    st["observedGeneration"] = gen
    st.setdefault("attempt", 0)
    st.setdefault("preemptions", 0)
    st.setdefault("restarts", 0)
    d = Decision(status=st)
    now = obs.now
    attempt = current_attempt(st, obs.pods)
    st["attempt"] = attempt
    current = sorted((p for p in obs.pods if p.attempt == attempt), key=lambda p: p.rank)
    older_alive = [p for p in obs.pods if p.attempt < attempt and p.phase not in ("Succeeded", "Failed")]
    alive = [p for p in current if p.phase not in ("Succeeded", "Failed")]

    # Cost accrues for the time containers ran, in COST_STEP_SECONDS steps (a status write per
    # job per minute at most, not one per event: each write is itself an event), and at once
    # when a container has ended since the last step (its tail must not be lost).
    if obs.spec is not None and obs.gpu_price is not None:
        since = parse_time((st.get("cost") or {}).get("accruedUntil"))
        container_ended = any(p.finished_at and (since is None or p.finished_at > since) for p in obs.pods)
        if since is None or container_ended or (now - since).total_seconds() >= COST_STEP_SECONDS:
            st["cost"] = accrue(st.get("cost"), obs.pods, obs.nodes, obs.spec.resources, obs.gpu_price, now)
    records = goodput.rank0_records(obs.pods, obs.progress, attempt)  # goodput facts (and tokens) of rank 0
    if records and obs.spec is not None:
        before = bool(st["preemptions"]) and not st["restarts"]  # (a status from before the ledger)
        st["cost"] = goodput.observe_records(st.get("cost"), records, obs.spec.resources.workers, before)

    if st.get("phase") in ("Succeeded", "Failed"):
        # Finished: never recreate children; stop stragglers; honour the TTL.
        d.delete_pods = [p.name for p in obs.pods if p.phase not in ("Succeeded", "Failed") and not p.deleting]
        ttl = obs.spec.run_policy.ttl_seconds_after_finished if obs.spec else None
        done = parse_time(st.get("completionTime"))
        if ttl is not None and done is not None and (now - done).total_seconds() >= ttl:
            d.delete_job = True
        return d

    if obs.spec is None:
        _finish(st, obs, d, False, "InvalidSpec", obs.spec_error or "spec could not be read", alive)
        return d
    spec = obs.spec
    if obs.progress is not None:
        apply_progress(st, obs.progress, now)

    # Suspend: stop the pods (they checkpoint on SIGTERM); the next attempt resumes.
    if spec.run_policy.suspend:
        if alive:
            _end_attempt(st, obs, d, attempt, alive)
            d.events.append(Event("Normal", "Suspended", f"deleting {len(alive)} worker pod(s); they checkpoint first"))
        st["phase"] = "Suspended"
        st["message"] = "suspended (spec.runPolicy.suspend)"
        set_condition(st, "Suspended", True, "Suspended", "spec.runPolicy.suspend is true", now, gen)
        set_condition(st, "Running", False, "Suspended", "suspended", now, gen)
        return d
    # Budget: at a limit, stop the same way (the pods checkpoint on SIGTERM); raising it resumes.
    if _over_budget(st, obs, d, attempt, alive):
        return d
    suspended = condition(st, "Suspended")
    if suspended and suspended["status"] == "True":
        why = (
            "within spec.budget again" if suspended["reason"] == "BudgetExceeded" else "spec.runPolicy.suspend is false"
        )
        set_condition(st, "Suspended", False, "Resumed", why, now, gen)
        d.events.append(Event("Normal", "Resumed", "resuming from the last checkpoint"))
        st["phase"] = "Pending"

    deadline = spec.run_policy.active_deadline_seconds
    started = parse_time(st.get("startTime"))
    if deadline and started and (now - started).total_seconds() >= deadline:
        _finish(
            st,
            obs,
            d,
            False,
            "DeadlineExceeded",
            f"job was active longer than activeDeadlineSeconds={deadline}",
            alive + older_alive,
        )
        return d

    st.setdefault("phase", "Pending")
    # Pods the job recorded as created but that are gone: deleted with their node (spot reclaim),
    # perhaps while the operator was down. ("Creating" entries were never seen: a failed create is
    # retried, not counted as a preemption.)
    recorded = {
        w["name"] for w in st.get("workers") or [] if w.get("attempt") == attempt and w.get("phase") != "Creating"
    }
    vanished = sorted(recorded - {p.name for p in current})
    if not current and not vanished:
        return _start_attempt(st, obs, d, attempt, older_alive)
    outcomes = {p.name: classify(p) for p in current}
    for name in vanished:
        outcomes[name] = "preempted"
    workers = spec.resources.workers

    if len(current) == workers and all(o == "succeeded" for o in outcomes.values()) and not vanished:
        if obs.progress is None:
            final = final_record(current[0])
            if final:
                apply_progress(st, final, now)
        msg = f"fine-tuning finished after {st['preemptions']} preemption(s)"
        if st.get("outputUri"):
            msg += f"; output at {st['outputUri']}"
        st.setdefault("progress", {})["progressPercentage"] = 100
        st["progress"]["estimatedRemainingSeconds"] = 0
        _finish(st, obs, d, True, "Succeeded", msg, alive)
        return d

    ended = [(n, o) for n, o in outcomes.items() if o in ("preempted", "user_error", "failed")]
    if ended:
        by_name = {p.name: p for p in current}
        for p in current:  # the trainer's last words carry resumable progress
            final = final_record(p) if p.rank == 0 else None
            if final and obs.progress is None:
                apply_progress(st, final, now)
        kinds = {o for _, o in ended}
        if "user_error" in kinds:
            name = next(n for n, o in ended if o == "user_error")
            _finish(st, obs, d, False, "TrainerUserError", trainer_message(by_name[name]), alive)
            return d
        if "preempted" in kinds:
            name = next(n for n, o in ended if o == "preempted")
            pod = by_name.get(name)
            how = (
                "pod deleted with its node"
                if pod is None
                else (pod.disruption or pod.reason or ("deleted" if pod.deleting else "SIGTERM"))
            )
            st["preemptions"] += 1
            message = (
                f"worker {name} preempted ({how}); "
                f"preemption {st['preemptions']} of at most {spec.capacity.max_preemptions}"
            )
            if st.get("lastCheckpoint"):
                message += f"; resuming from step {st['lastCheckpoint']['step']}"
            set_condition(st, "Preempted", True, "Preempted", message, now, gen)
            d.events.append(Event("Warning", "Preempted", message))
            if st["preemptions"] > spec.capacity.max_preemptions:
                if (
                    spec.capacity.fallback_to_on_demand
                    and spec.capacity.policy != "on-demand"
                    and not st.get("onDemandFallback")
                ):
                    st["onDemandFallback"] = True
                    d.events.append(
                        Event(
                            "Warning",
                            "FallbackToOnDemand",
                            f"{st['preemptions']} preemptions > maxPreemptions; continuing on on-demand nodes",
                        )
                    )
                elif not (st.get("onDemandFallback") and spec.capacity.fallback_to_on_demand):
                    _finish(
                        st,
                        obs,
                        d,
                        False,
                        "TooManyPreemptions",
                        f"{st['preemptions']} preemptions > capacity.maxPreemptions={spec.capacity.max_preemptions}",
                        alive,
                    )
                    return d
            return _end_attempt(st, obs, d, attempt, alive, preempted=True)
        name = next(n for n, o in ended if o == "failed")
        st["restarts"] += 1
        why = trainer_message(by_name[name])
        if st["restarts"] > spec.run_policy.backoff_limit:
            _finish(
                st,
                obs,
                d,
                False,
                "BackoffLimitExceeded",
                f"{st['restarts']} failures > runPolicy.backoffLimit={spec.run_policy.backoff_limit}; last: {why}",
                alive,
            )
            return d
        d.events.append(
            Event("Warning", "WorkerFailed", f"{why}; restart {st['restarts']} of {spec.run_policy.backoff_limit}")
        )
        set_condition(st, "Running", False, "WorkerFailed", why, now, gen)
        return _end_attempt(st, obs, d, attempt, alive)

    # Still going: start the remaining ranks once rank 0 has an address.
    missing_ranks = sorted(set(range(workers)) - {p.rank for p in current})
    rank0 = next((p for p in current if p.rank == 0), None)
    if missing_ranks and rank0 is not None and rank0.ip:
        d.create_pods = [(attempt, r) for r in missing_ranks]
        d.master_addr = rank0.ip
        d.on_demand = bool(st.get("onDemandFallback"))
    _observe_running(st, obs, d, current)
    return d


def _over_budget(st: dict[str, Any], obs: Observed, d: Decision, attempt: int, alive: list[PodView]) -> bool:
    """spec.budget against the cost accrued up to now (not only up to the last cost step, so a
    limit holds within one sweep). At 100%: delete the pods as a suspend does, phase Suspended,
    condition BudgetExceeded; True. At 80%: one Warning per budget, recorded in status.budget."""
    spec, now = obs.spec, obs.now
    assert spec is not None
    gen = obs.job["metadata"].get("generation")
    was_exceeded = (condition(st, "BudgetExceeded") or {}).get("status") == "True"
    cost = st.get("cost")
    if spec.budget and obs.gpu_price is not None and cost:
        cost = accrue(cost, obs.pods, obs.nodes, spec.resources, obs.gpu_price, now)
    used = budget.usages(spec.budget, cost)
    if not used or used[0].ratio < budget.WARN_RATIO:
        if was_exceeded:
            why = "spec.budget removed" if not used else f"within budget: {used[0].describe()}"
            set_condition(st, "BudgetExceeded", False, "WithinBudget", why, now, gen)
        return False
    worst, limits = used[0], budget.limits(spec.budget)
    warned = (st.get("budget") or {}).get("warnedFor") == limits
    if worst.ratio < 1:
        if was_exceeded:
            set_condition(st, "BudgetExceeded", False, "WithinBudget", f"within budget: {worst.describe()}", now, gen)
        if not warned:
            d.events.append(Event("Warning", "BudgetNearlyExceeded", budget.nearly_exceeded_message(worst)))
            st["budget"] = {"warnedFor": limits, "warnedTime": rfc3339(now)}
            st["cost"] = cost  # the amount the warning names is the one the status shows
        return False
    if _amounts(cost) != _amounts(st.get("cost")):
        st["cost"] = cost  # (unchanged amounts: no write just to move accruedUntil)
    message = budget.exceeded_message(worst)
    if not warned:  # jumped past 80% in one step: no separate warning for this budget
        st["budget"] = {"warnedFor": limits, "warnedTime": rfc3339(now)}
    if set_condition(st, "BudgetExceeded", True, "BudgetExceeded", message, now, gen) or alive:
        stopping = f"; deleting {len(alive)} worker pod(s), they checkpoint first" if alive else ""
        d.events.append(Event("Warning", "BudgetExceeded", message + stopping))
    if alive:
        _end_attempt(st, obs, d, attempt, alive)
    st["phase"] = "Suspended"
    st["message"] = message
    set_condition(st, "Suspended", True, "BudgetExceeded", f"spec.budget.{worst.field} reached", now, gen)
    set_condition(st, "Running", False, "BudgetExceeded", "suspended: budget reached", now, gen)
    return True


def _amounts(cost: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (cost or {}).items() if k != "accruedUntil"}


def _start_attempt(
    st: dict[str, Any], obs: Observed, d: Decision, attempt: int, older_alive: list[PodView]
) -> Decision:
    gen = obs.job["metadata"].get("generation")
    now = obs.now
    if obs.preflight_problem:
        reason, message = obs.preflight_problem
        if set_condition(st, "Ready", False, reason, message, now, gen):
            d.events.append(Event("Warning", reason, message))
        st["message"] = message
        return d
    if obs.spec is not None and decide_sizing.needed(obs.spec):
        sizing = decide_sizing.size(st, obs)
        d.events += sizing.events
        if not sizing.proceed:
            d.ensure_config = d.ensure_config or sizing.create_pod is not None  # the sizing pod reads it
            d.create_sizing_pod, d.keep_sizing_pod = sizing.create_pod, sizing.keep_pod
            return d
    ready = condition(st, "Ready") or {}
    if ready.get("reason") != "PodRejected":  # a refused pod (quota): Ready turns True once a pod exists
        set_condition(st, "Ready", True, "PreflightPassed", PREFLIGHT_PASSED, now, gen)
    if older_alive:
        # The previous attempt's pods are still writing their final checkpoint: wait for them.
        d.delete_pods += [p.name for p in older_alive if not p.deleting]
        st["message"] = f"waiting for {len(older_alive)} pod(s) of the previous attempt to stop"
        return d
    d.ensure_config = True
    d.create_pods = [(attempt, 0)]  # rank > 0 follows once rank 0 has an IP (MASTER_ADDR)
    d.on_demand = bool(st.get("onDemandFallback"))
    st["workers"] = [{"name": _pod_name(obs, attempt, 0), "rank": 0, "phase": "Creating", "attempt": attempt}]
    what = (
        "created trainer pod"
        if attempt == 0
        else f"created trainer pod for attempt {attempt} (resumes from the last checkpoint)"
    )
    set_condition(st, "Created", True, "PodsCreated", what, now, gen)
    d.events.append(Event("Normal", "PodsCreated", f"{what}: {_pod_name(obs, attempt, 0)}"))
    st["message"] = what
    return d


def _pod_name(obs: Observed, attempt: int, rank: int) -> str:
    return pod_name(obs.job["metadata"]["name"], attempt, rank)


def _observe_running(st: dict[str, Any], obs: Observed, d: Decision, current: list[PodView]) -> None:
    gen = obs.job["metadata"].get("generation")
    now = obs.now
    spec = obs.spec
    assert spec is not None
    st["workers"] = [
        {
            k: v
            for k, v in {
                "name": p.name,
                "rank": p.rank,
                "phase": p.phase,
                "node": p.node,
                "attempt": p.attempt,
                "capacityType": obs.nodes[p.node].capacity_type if p.node in obs.nodes else None,
            }.items()
            if v is not None
        }
        for p in current
    ]
    # Pods we are about to create count as recorded too, so their disappearance is noticed.
    for attempt, rank in d.create_pods:
        st["workers"].append(
            {"name": _pod_name(obs, attempt, rank), "rank": rank, "phase": "Creating", "attempt": attempt}
        )

    if current and (condition(st, "Ready") or {}).get("reason") == "PodRejected":
        set_condition(st, "Ready", True, "PreflightPassed", PREFLIGHT_PASSED, now, gen)
    problems = []
    for p in current:
        if p.unschedulable:
            reason = "Unschedulable"
            msg = f"{p.name}: {p.unschedulable}"
            if spec.resources.gpu_type and obs.gpu_type_known is False:
                reason = "UnknownGPUType"
                msg = (
                    f"no node has GPU type {spec.resources.gpu_type!r} (resources.gpuType); waiting for such a "
                    f"node to join. Scheduler: {p.unschedulable}"
                )
            elif spec.capacity.policy == "spot":
                msg += " (capacity.policy is spot: only spot nodes qualify)"
            problems.append(("Scheduled", reason, msg))
        if p.waiting_reason in WAITING_PROBLEMS:
            problems.append(
                (
                    "Running",
                    WAITING_PROBLEMS[p.waiting_reason],
                    f"{p.name}: {p.waiting_reason}: {p.waiting_message or ''}".strip(),
                )
            )

    scheduled_problem = next((pr for pr in problems if pr[0] == "Scheduled"), None)
    if scheduled_problem:
        if set_condition(st, "Scheduled", False, scheduled_problem[1], scheduled_problem[2], now, gen):
            d.events.append(Event("Warning", scheduled_problem[1], scheduled_problem[2]))
        st["message"] = scheduled_problem[2]
    elif all(p.node for p in current):
        set_condition(st, "Scheduled", True, "Scheduled", "all workers have a node", now, gen)

    running_problem = next((pr for pr in problems if pr[0] == "Running"), None)
    if running_problem and running_problem[1] in PERMANENT_WAITING:
        _finish(st, obs, d, False, running_problem[1], running_problem[2], [p for p in current if p.phase != "Failed"])
        return
    if running_problem:
        if set_condition(st, "Running", False, running_problem[1], running_problem[2], now, gen):
            d.events.append(Event("Warning", running_problem[1], running_problem[2]))
        st["message"] = running_problem[2]
    elif len(current) == spec.resources.workers and all(p.phase == "Running" for p in current):
        st.setdefault("startTime", rfc3339(now))
        if st.get("phase") != "Running":
            d.events.append(
                Event("Normal", "Running", f"{len(current)} worker(s) running (attempt {current[0].attempt})")
            )
        st["phase"] = "Running"
        st["message"] = "training"
        set_condition(st, "Running", True, "Running", "all workers are running", now, gen)
        preempted = condition(st, "Preempted")
        if preempted and preempted["status"] == "True":
            set_condition(st, "Preempted", False, "Resumed", f"running again; last: {preempted['message']}", now, gen)
