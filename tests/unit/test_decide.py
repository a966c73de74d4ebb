"""The reconcile decision, as a pure function: observed state in, actions out."""

from __future__ import annotations

import datetime as dt

import pytest

from kubetune_contract.progress import ExitCode, ProgressRecord
from kubetune_dev.jobs import job_manifest
from kubetune_operator import api
from kubetune_operator.decide import classify, decide
from kubetune_operator.jobstatus import pod_rejected, set_condition
from kubetune_operator.views import NodeView, Observed, PodView

T0 = dt.datetime(2026, 11, 22, 12, 0, 0, tzinfo=dt.UTC)


def job(status=None, generation=1, **spec_overrides):
    manifest = job_manifest(name="j", **spec_overrides)
    manifest["metadata"].update(namespace="ns", uid="uid-1", generation=generation, resourceVersion="1")
    manifest["status"] = status or {}
    return manifest


def observe(j, pods=(), now=T0, **kw) -> Observed:
    spec = api.FineTuneJobSpec.model_validate(j["spec"])
    return Observed(job=j, spec=spec, now=now, pods=tuple(pods), gpu_price=lambda node, res: 1.0, **kw)


def pod(attempt=0, rank=0, phase="Running", **kw) -> PodView:
    defaults = {"node": "n1", "ip": "10.0.0.5", "started_at": T0 - dt.timedelta(hours=3)} if phase != "Pending" else {}
    return PodView(name=f"j-a{attempt}-w{rank}", attempt=attempt, rank=rank, phase=phase, **{**defaults, **kw})


def after(d, j):
    """The job as it would read after the decision's status write."""
    j = dict(j)
    j["status"] = d.status
    return j


def test_new_job_creates_rank_zero_and_the_config_first():
    d = decide(observe(job()))
    assert d.create_pods == [(0, 0)] and d.ensure_config
    assert d.status["phase"] == "Pending" and d.status["attempt"] == 0
    assert d.status["workers"] == [{"name": "j-a0-w0", "rank": 0, "phase": "Creating", "attempt": 0}]
    assert [e.reason for e in d.events] == ["PodsCreated"]


def test_preflight_problem_keeps_the_job_pending_with_the_reason_and_creates_nothing():
    d = decide(observe(job(), preflight_problem=("SecretNotFound", "Secret 's3' not found")))
    assert not d.create_pods and d.status["phase"] == "Pending"
    ready = next(c for c in d.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "SecretNotFound")
    # The same problem seen again is not a new event (no event storm from the sweep).
    d2 = decide(observe(after(d, job()), preflight_problem=("SecretNotFound", "Secret 's3' not found")))
    assert d2.events == []


def test_running_pod_makes_the_job_running_once():
    j = job(status={"attempt": 0, "phase": "Pending"})
    d = decide(observe(j, [pod()], nodes={"n1": NodeView("n1", "spot")}))
    assert d.status["phase"] == "Running" and d.status["startTime"] == "2026-11-22T12:00:00Z"
    assert d.status["workers"][0]["capacityType"] == "spot"
    assert [e.reason for e in d.events] == ["Running"]
    d2 = decide(observe(after(d, j), [pod()], now=T0 + dt.timedelta(seconds=10)))
    assert d2.events == [] and d2.status["startTime"] == "2026-11-22T12:00:00Z"


@pytest.mark.parametrize(
    "view",
    [
        pod(exit_code=ExitCode.PREEMPTED, phase="Failed"),
        pod(disruption="EvictionByEvictionAPI"),
        pod(deleting=True),
        pod(phase="Failed", reason="Evicted"),
        pod(phase="Failed", reason="NodeShutdown", exit_code=137),
    ],
)
def test_preemption_signals(view):
    assert classify(view) == "preempted"


@pytest.mark.parametrize(
    "view,outcome",
    [
        (pod(phase="Succeeded", exit_code=0), "succeeded"),
        (pod(phase="Failed", exit_code=ExitCode.USER_ERROR), "user_error"),
        (pod(phase="Failed", exit_code=137, reason="OOMKilled"), "failed"),
        (pod(phase="Failed", exit_code=1), "failed"),
        (pod(phase="Pending"), "pending"),
    ],
)
def test_other_outcomes(view, outcome):
    assert classify(view) == outcome


def test_preempted_pod_still_terminating_ends_the_attempt_but_waits_before_the_next():
    j = job(
        status={
            "attempt": 0,
            "phase": "Running",
            "workers": [{"name": "j-a0-w0", "rank": 0, "phase": "Running", "attempt": 0}],
        }
    )
    d = decide(observe(j, [pod(deleting=True, disruption="EvictionByEvictionAPI")]))
    assert d.status["preemptions"] == 1 and d.status["attempt"] == 1 and d.status["phase"] == "Restarting"
    assert d.create_pods == [] and d.delete_pods == []  # it is already being deleted; its checkpoint is in flight
    # Same pod seen again: counted once.
    d2 = decide(observe(after(d, j), [pod(deleting=True, disruption="EvictionByEvictionAPI")]))
    assert d2.status["preemptions"] == 1 and d2.create_pods == []
    # Gone: the next attempt starts at once.
    d3 = decide(observe(after(d2, j), []))
    assert d3.create_pods == [(1, 0)] and d3.status["preemptions"] == 1


def test_pod_vanished_with_its_node_is_a_preemption_and_restarts_at_once():
    j = job(
        status={
            "attempt": 2,
            "phase": "Running",
            "preemptions": 2,
            "workers": [{"name": "j-a2-w0", "rank": 0, "phase": "Running", "attempt": 2}],
            "lastCheckpoint": {"uri": "s3://b/c/step-40", "step": 40, "time": "2026-11-22T11:59:00Z"},
        }
    )
    d = decide(observe(j, []))
    assert d.status["preemptions"] == 3 and d.create_pods == [(3, 0)]
    assert "resuming from step 40" in next(e.message for e in d.events if e.reason == "Preempted")


def test_a_pod_that_was_never_seen_is_recreated_not_counted():
    j = job(
        status={
            "attempt": 0,
            "phase": "Pending",
            "workers": [{"name": "j-a0-w0", "rank": 0, "phase": "Creating", "attempt": 0}],
        }
    )
    d = decide(observe(j, []))
    assert d.create_pods == [(0, 0)] and d.status["preemptions"] == 0


def test_max_preemptions_then_fallback_then_failure():
    base = {"attempt": 0, "phase": "Running", "preemptions": 1}
    evicted = [pod(phase="Failed", reason="Evicted")]
    d = decide(observe(job(status=dict(base), capacity={"maxPreemptions": 1}), evicted))
    assert d.status["phase"] == "Failed"
    assert next(c for c in d.status["conditions"] if c["type"] == "Failed")["reason"] == "TooManyPreemptions"

    d = decide(
        observe(
            job(status=dict(base), capacity={"policy": "spot", "maxPreemptions": 1, "fallbackToOnDemand": True}),
            evicted,
        )
    )
    assert d.status["onDemandFallback"] is True and d.create_pods == [(1, 0)] and d.on_demand
    # Once on on-demand, preemptions (rare, but drains happen) no longer fail the job.
    st = dict(d.status, attempt=1, phase="Running")
    d = decide(
        observe(
            job(status=st, capacity={"policy": "spot", "maxPreemptions": 1, "fallbackToOnDemand": True}),
            [pod(attempt=1, phase="Failed", reason="Evicted")],
        )
    )
    assert d.status["phase"] == "Restarting" and d.create_pods == [(2, 0)] and d.on_demand


def test_user_error_fails_with_the_trainers_message_and_no_retry():
    record = ProgressRecord(phase="failed", message="data.jsonl line 7: missing field 'response'")
    j = job(status={"attempt": 0, "phase": "Running"})
    d = decide(observe(j, [pod(phase="Failed", exit_code=2, message=record.model_dump_json(by_alias=True))]))
    assert d.status["phase"] == "Failed" and not d.create_pods
    failed = next(c for c in d.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "TrainerUserError" and failed["message"] == "data.jsonl line 7: missing field 'response'"


def test_infrastructure_failure_retries_then_hits_the_backoff_limit():
    j = job(status={"attempt": 0, "phase": "Running"}, runPolicy={"backoffLimit": 1})
    d = decide(observe(j, [pod(phase="Failed", exit_code=137, reason="OOMKilled")]))
    assert d.status["restarts"] == 1 and d.create_pods == [(1, 0)]
    d = decide(
        observe(
            after(d, j),
            [pod(phase="Failed", exit_code=137, reason="OOMKilled"), pod(attempt=1, phase="Failed", exit_code=1)],
        )
    )
    assert d.status["phase"] == "Failed"
    assert "backoffLimit=1" in d.status["message"]


def test_one_failed_worker_stops_its_peers():
    j = job(status={"attempt": 0, "phase": "Running"}, resources={"workers": 2})
    d = decide(observe(j, [pod(rank=0), pod(rank=1, phase="Failed", exit_code=1)]))
    assert d.delete_pods == ["j-a0-w0"] and d.status["attempt"] == 1 and d.create_pods == []


def test_rank_zero_address_goes_to_the_other_ranks():
    j = job(status={"attempt": 0, "phase": "Pending"}, resources={"workers": 3})
    d = decide(observe(j, [pod(rank=0, phase="Pending")]))
    assert d.create_pods == []  # no address yet
    d = decide(observe(j, [pod(rank=0, ip="10.1.2.3")]))
    assert d.create_pods == [(0, 1), (0, 2)] and d.master_addr == "10.1.2.3"


def test_success_needs_every_worker_and_carries_the_final_record():
    record = ProgressRecord(phase="done", step=100, total_steps=100, loss=0.5, output_uri="s3://o/ns/j")
    j = job(status={"attempt": 0, "phase": "Running"}, resources={"workers": 2})
    ok = pod(phase="Succeeded", exit_code=0, message=record.model_dump_json(by_alias=True))
    assert decide(observe(j, [ok, pod(rank=1)])).status["phase"] == "Running"
    d = decide(observe(j, [ok, pod(rank=1, phase="Succeeded", exit_code=0)]))
    assert d.status["phase"] == "Succeeded" and d.status["outputUri"] == "s3://o/ns/j"
    assert d.status["progress"]["progressPercentage"] == 100 and d.status["completionTime"]


def test_finished_jobs_never_recreate_children_and_honour_the_ttl():
    st = {"phase": "Succeeded", "completionTime": "2026-11-22T12:00:00Z", "attempt": 0}
    d = decide(
        observe(job(status=st, runPolicy={"ttlSecondsAfterFinished": 60}), [], now=T0 + dt.timedelta(seconds=30))
    )
    assert not d.create_pods and not d.delete_job
    d = decide(
        observe(job(status=st, runPolicy={"ttlSecondsAfterFinished": 60}), [], now=T0 + dt.timedelta(seconds=61))
    )
    assert d.delete_job


def test_suspend_deletes_pods_without_counting_and_resume_starts_the_next_attempt():
    j = job(status={"attempt": 0, "phase": "Running"}, runPolicy={"suspend": True})
    d = decide(observe(j, [pod()]))
    assert d.delete_pods == ["j-a0-w0"] and d.status["phase"] == "Suspended" and d.status["attempt"] == 1
    assert d.status["preemptions"] == 0 and d.status["restarts"] == 0
    resumed = job(status=d.status, runPolicy={"suspend": False})
    d = decide(observe(resumed, []))
    assert d.create_pods == [(1, 0)]
    assert next(c for c in d.status["conditions"] if c["type"] == "Suspended")["status"] == "False"


def test_active_deadline():
    j = job(
        status={"attempt": 0, "phase": "Running", "startTime": "2026-11-22T12:00:00Z"},
        runPolicy={"activeDeadlineSeconds": 60},
    )
    assert decide(observe(j, [pod()], now=T0 + dt.timedelta(seconds=59))).status["phase"] == "Running"
    d = decide(observe(j, [pod()], now=T0 + dt.timedelta(seconds=60)))
    assert d.status["phase"] == "Failed" and d.delete_pods == ["j-a0-w0"]


def test_unschedulable_pod_says_why_and_names_an_unknown_gpu_type():
    j = job(status={"attempt": 0, "phase": "Pending"}, resources={"gpus": 1, "gpuType": "NVIDIA-Z9000"})
    view = pod(phase="Pending", unschedulable="0/3 nodes are available: 3 node(s) didn't match node affinity")
    d = decide(observe(j, [view], gpu_type_known=False))
    cond = next(c for c in d.status["conditions"] if c["type"] == "Scheduled")
    assert cond["reason"] == "UnknownGPUType" and "NVIDIA-Z9000" in cond["message"]
    d = decide(observe(j, [view], gpu_type_known=True))
    assert next(c for c in d.status["conditions"] if c["type"] == "Scheduled")["reason"] == "Unschedulable"


def test_image_problems():
    j = job(status={"attempt": 0, "phase": "Pending"})
    d = decide(
        observe(j, [pod(phase="Pending", node="n1", waiting_reason="ImagePullBackOff", waiting_message="not found")])
    )
    assert next(c for c in d.status["conditions"] if c["type"] == "Running")["reason"] == "ImagePullFailed"
    assert d.status["phase"] == "Pending"
    d = decide(observe(j, [pod(phase="Pending", node="n1", waiting_reason="InvalidImageName")]))
    assert d.status["phase"] == "Failed"


def test_progress_and_cost_land_in_status():
    record = ProgressRecord(
        phase="training",
        step=30,
        total_steps=120,
        loss=2.5,
        steps_per_second=0.5,
        last_checkpoint={"uri": "s3://b/p/step-20", "step": 20, "time": "2026-11-22T11:59:30Z"},
    )
    st = {
        "attempt": 0,
        "phase": "Running",
        "cost": {"estimatedUsd": "1.0000", "gpuHours": 0, "accruedUntil": "2026-11-22T11:00:00Z"},
    }
    d = decide(observe(job(status=st), [pod()], progress=record))
    assert d.status["progress"]["progressPercentage"] == 25 and d.status["progress"]["estimatedRemainingSeconds"] == 180
    assert d.status["lastCheckpoint"]["step"] == 20
    assert d.status["cost"]["estimatedUsd"] == "2.0000"  # one hour at the test's 1 USD/h
    # Less than a cost step later: no new accrual, so no status write just for the cost.
    d2 = decide(observe(after(d, job(status=st)), [pod()], progress=record, now=T0 + dt.timedelta(seconds=30)))
    assert d2.status["cost"] == d.status["cost"]


def test_undeclared_status_fields_are_not_written_back():
    d = decide(observe(job(status={"kopf": {"progress": {}}, "phase": "Pending", "attempt": 0}), []))
    assert "kopf" not in d.status


def test_set_condition_keeps_transition_time_unless_the_status_flips():
    st: dict = {}
    assert set_condition(st, "Ready", False, "A", "a", T0, 1)
    assert not set_condition(st, "Ready", False, "B", "b", T0 + dt.timedelta(minutes=1), 1)
    assert st["conditions"][0]["lastTransitionTime"] == "2026-11-22T12:00:00Z" and st["conditions"][0]["reason"] == "B"
    assert set_condition(st, "Ready", True, "C", "c", T0 + dt.timedelta(minutes=2), 2)
    assert st["conditions"][0]["lastTransitionTime"] == "2026-11-22T12:02:00Z"


def test_pod_rejected_is_final_for_invalid_and_pending_for_quota():
    st = pod_rejected(
        {"phase": "Pending", "workers": [{"name": "x"}]}, "spec.containers[0].env[5].name: Required value", True, T0, 1
    )
    assert st["phase"] == "Failed" and "env[5].name" in st["message"] and "workers" not in st
    st = pod_rejected({"phase": "Pending"}, "exceeded quota: gpu", False, T0, 1)
    assert st["phase"] == "Pending"


def test_a_resuming_trainer_does_not_reset_the_progress_shown():
    st = {"attempt": 1, "phase": "Running", "progress": {"step": 100, "totalSteps": 120, "progressPercentage": 83}}
    d = decide(observe(job(status=st), [pod(attempt=1)], progress=ProgressRecord(phase="loading", step=0)))
    assert d.status["progress"]["step"] == 100
    d = decide(
        observe(
            job(status=st),
            [pod(attempt=1)],
            progress=ProgressRecord(phase="training", step=101, total_steps=120, resumed_from_step=100),
        )
    )
    assert d.status["progress"]["step"] == 101 and d.status["progress"]["resumedFromStep"] == 100


def test_cost_of_a_finished_container_is_accrued_at_once():
    st = {"attempt": 0, "phase": "Running", "cost": {"estimatedUsd": "0.0000", "accruedUntil": "2026-11-22T12:00:00Z"}}
    done = pod(
        phase="Succeeded", exit_code=0, started_at=T0 - dt.timedelta(hours=1), finished_at=T0 + dt.timedelta(seconds=36)
    )
    d = decide(observe(job(status=st), [done], now=T0 + dt.timedelta(seconds=40)))
    assert d.status["cost"]["estimatedUsd"] == "0.0100"  # 36 s at 1 USD/h, not the 40 s to now


@pytest.mark.parametrize(
    "text",
    ["2026-11-22T12:00:00Z", "2026-11-22T12:00:00+00:00", "2026-11-22T12:00:00.123456Z", "2026-11-22T13:00:00+01:00"],
)
def test_parse_time_reads_every_rfc3339_form_kubernetes_writes(text):
    from kubetune_operator.timeutil import parse_time

    assert parse_time(text).replace(microsecond=0) == T0


def test_parse_time_never_raises():
    from kubetune_operator.timeutil import parse_time

    assert parse_time("yesterday") is None and parse_time(None) is None


# ---- budget --------------------------------------------------------------------------------
# observe() prices a worker at 1 USD an hour; the pod has run since long before T0, and cost is
# accrued up to T0: at T0 + m minutes the job has used m/60 USD more.
def _accrued(usd="0.0000", gpu_hours=0.0):
    return {"estimatedUsd": usd, "onDemandUsd": usd, "gpuHours": gpu_hours, "accruedUntil": "2026-11-22T12:00:00Z"}


def _cond(d, ctype):
    return next((c for c in d.status.get("conditions") or [] if c["type"] == ctype), None)


def _reasons(d):
    return [e.reason for e in d.events]


def test_no_budget_no_effect():
    status = {"attempt": 0, "phase": "Running", "cost": _accrued("900.0000")}
    later = T0 + dt.timedelta(minutes=90)
    plain = decide(observe(job(status=status), [pod()], now=later))
    empty = decide(observe(job(status=status, budget={}), [pod()], now=later))
    assert plain.status == empty.status and plain.events == empty.events and not empty.delete_pods
    assert "budget" not in empty.status and _cond(empty, "BudgetExceeded") is None


def test_budget_warns_once_at_80_percent_and_records_it():
    j = job(status={"attempt": 0, "phase": "Running", "cost": _accrued()}, budget={"maxUsd": 1})
    d = decide(observe(j, [pod()], now=T0 + dt.timedelta(minutes=30)))
    assert "BudgetNearlyExceeded" not in _reasons(d)
    d = decide(observe(j, [pod()], now=T0 + dt.timedelta(minutes=50)))
    (warning,) = [e for e in d.events if e.reason == "BudgetNearlyExceeded"]
    assert warning.type == "Warning" and "USD 0.8333 of spec.budget.maxUsd 1 (83%)" in warning.message
    assert d.status["budget"] == {"warnedFor": {"maxUsd": 1.0}, "warnedTime": "2026-11-22T12:50:00Z"}
    assert d.status["cost"]["estimatedUsd"] == "0.8333"  # the amount the warning names
    assert not d.delete_pods and d.status["phase"] == "Running"
    # Later passes (and a restarted operator: the record is in status) do not warn again.
    d2 = decide(observe(after(d, j), [pod()], now=T0 + dt.timedelta(minutes=55)))
    assert "BudgetNearlyExceeded" not in _reasons(d2) and not d2.delete_pods
    # A changed budget warns again at its own 80%.
    raised = job(status=d2.status, budget={"maxUsd": 1.1})
    d3 = decide(observe(raised, [pod()], now=T0 + dt.timedelta(minutes=56)))
    assert _reasons(d3) == ["BudgetNearlyExceeded"] and d3.status["budget"]["warnedFor"] == {"maxUsd": 1.1}


def test_budget_reached_checkpoints_and_suspends_then_a_raise_resumes():
    j = job(status={"attempt": 0, "phase": "Running", "cost": _accrued()}, budget={"maxUsd": 1})
    d = decide(observe(j, [pod()], now=T0 + dt.timedelta(minutes=61)))
    # Stopped the way a suspend stops: the pod is deleted (SIGTERM: it checkpoints), no preemption.
    assert d.delete_pods == ["j-a0-w0"] and not d.create_pods
    assert d.status["phase"] == "Suspended" and d.status["attempt"] == 1
    assert d.status["preemptions"] == 0 and d.status["restarts"] == 0
    exceeded = _cond(d, "BudgetExceeded")
    assert (exceeded["status"], exceeded["reason"]) == ("True", "BudgetExceeded")
    assert "estimated USD 1.0167 of spec.budget.maxUsd 1 (102%)" in exceeded["message"]
    assert d.status["cost"]["estimatedUsd"] == "1.0167"
    assert _cond(d, "Suspended")["reason"] == "BudgetExceeded" and _cond(d, "Running")["status"] == "False"
    (event,) = d.events
    assert (event.type, event.reason) == ("Warning", "BudgetExceeded") and "deleting 1 worker pod" in event.message
    # While the pod writes its checkpoint and goes: nothing new is started, no second event.
    stopping = pod(deleting=True)
    d2 = decide(observe(after(d, j), [stopping], now=T0 + dt.timedelta(minutes=62)))
    assert not d2.create_pods and d2.events == [] and d2.status["phase"] == "Suspended"
    # Raised: the next attempt starts, resuming from the last checkpoint.
    raised = job(status=d2.status, budget={"maxUsd": 5})
    d3 = decide(observe(raised, [], now=T0 + dt.timedelta(minutes=63)))
    assert d3.create_pods == [(1, 0)]
    assert _cond(d3, "BudgetExceeded")["status"] == "False" and _cond(d3, "Suspended")["status"] == "False"
    assert _reasons(d3) == ["Resumed", "PodsCreated"]
    assert _cond(d3, "Suspended")["message"] == "within spec.budget again"
    # Removing the budget resumes it too.
    removed = job(status=d2.status)
    d4 = decide(observe(removed, [], now=T0 + dt.timedelta(minutes=63)))
    assert d4.create_pods == [(1, 0)] and _cond(d4, "BudgetExceeded")["message"] == "spec.budget removed"


def test_budget_raised_but_still_below_the_accrued_cost_stays_suspended():
    j = job(status={"attempt": 1, "phase": "Suspended", "cost": _accrued("3.0000")}, budget={"maxUsd": 2})
    d = decide(observe(j, []))
    assert not d.create_pods and d.status["phase"] == "Suspended"
    assert "spec.budget.maxUsd 2 (150%)" in _cond(d, "BudgetExceeded")["message"]


def test_budget_already_exceeded_creates_no_pods_and_says_why():
    status = {"cost": _accrued("0.0000", gpu_hours=3.0)}
    j = job(status=status, budget={"maxGpuHours": 2, "maxUsd": 100}, resources={"gpus": 1})
    d = decide(observe(j, []))
    assert not d.create_pods and not d.ensure_config and "workers" not in d.status
    assert d.status["phase"] == "Suspended" and _cond(d, "Created") is None
    exceeded = _cond(d, "BudgetExceeded")
    assert (
        exceeded["status"] == "True" and "3.0000 GPU-hours of spec.budget.maxGpuHours 2 (150%)" in exceeded["message"]
    )
    assert d.status["message"] == exceeded["message"]
    assert _reasons(d) == ["BudgetExceeded"]
