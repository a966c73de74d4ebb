"""A job's goodput across attempts (operator/goodput.py through decide): what status.cost says after
a SIGTERM preemption, a kill without SIGTERM, a failure, none of these; a CPU job; an operator
restart; a status written before these fields existed; and what the next attempt's pods are told."""

from __future__ import annotations

import datetime as dt
import json

from kubetune_contract import envvars
from kubetune_contract.jobcost import JobCostSoFar
from kubetune_contract.progress import ExitCode, ProgressRecord
from kubetune_dev.jobs import job_manifest
from kubetune_operator import api, goodput, render
from kubetune_operator.decide import decide
from kubetune_operator.settings import Settings
from kubetune_operator.views import NodeView, Observed, PodView

T0 = dt.datetime(2026, 11, 22, 12, 0, 0, tzinfo=dt.UTC)
NODES = {"n1": NodeView("n1", "spot", "NVIDIA-L4")}
PRICE = 3.6  # USD per worker-hour: 0.001 USD per worker-second


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


class Job:
    """One job's status carried from pass to pass, as the API server would keep it."""

    def __init__(self, status: dict | None = None, **spec) -> None:
        self.manifest = job_manifest(name="j", **spec)
        self.manifest["metadata"].update(namespace="ns", uid="uid-1", generation=1, resourceVersion="1")
        self.manifest["status"] = status or {}
        self.spec = api.FineTuneJobSpec.model_validate(self.manifest["spec"])

    def observe(self, pods=(), now=T0, progress=None) -> Observed:
        return Observed(
            job=self.manifest,
            spec=self.spec,
            now=now,
            pods=tuple(pods),
            nodes=NODES,
            progress=progress,
            gpu_price=lambda node, res: PRICE * max(1, res.gpus),
        )

    def run(self, pods=(), now=T0, progress=None):
        d = decide(self.observe(pods, now, progress))
        self.manifest = {**self.manifest, "status": d.status}
        return d

    @property
    def cost(self) -> dict:
        return self.manifest["status"]["cost"]

    @property
    def goodput(self) -> dict:
        return self.cost["goodput"]


def record(phase="training", **facts) -> ProgressRecord:
    return ProgressRecord(phase=phase, step=10, total_steps=100, **facts)


def worker(attempt, phase="Running", rank=0, start=0.0, end=None, message=None, **kw) -> PodView:
    return PodView(
        name=f"j-a{attempt}-w{rank}",
        attempt=attempt,
        rank=rank,
        phase=phase,
        node="n1",
        ip="10.0.0.5",
        created_at=at(start - 5),
        started_at=at(start),
        finished_at=None if end is None else at(end),
        message=None if message is None else message.model_dump_json(by_alias=True, exclude_none=True),
        **kw,
    )


FACTS_A0 = dict(startup_seconds=10.0, productive_seconds=100.0, checkpoint_blocked_seconds=5.0, recomputed_seconds=0.0)


def first_attempt(job: Job) -> None:
    """Attempt 0 starts at T0 (created 5 s before) and reports its facts at T0+120 s."""
    job.run(now=at(-10))
    job.run([worker(0)], at(0))
    job.run([worker(0)], at(120), progress=record(**FACTS_A0, tokens_seen=4000))


def test_sigterm_preemption_loses_the_next_start_up_and_nothing_is_recomputed():
    job = Job(resources={"gpus": 1, "gpuType": "NVIDIA-L4"}, preflight={"estimate": False})
    first_attempt(job)
    final0 = record("checkpointing", **{**FACTS_A0, "productive_seconds": 110.0}, tokens_seen=4400)
    d = job.run([worker(0, "Failed", end=130, exit_code=ExitCode.PREEMPTED, message=final0)], at(130))
    assert d.create_pods == [(1, 0)] and job.manifest["status"]["preemptions"] == 1
    # The next attempt's pod is told the totals so far and that it follows a preemption.
    told = JobCostSoFar.model_validate_json(d.job_cost or "")
    assert told.attempt == 1 and told.after_preemption and told.usd_per_worker_hour == PRICE
    assert told.goodput.productive_seconds == 110 and told.goodput.startup_seconds == 10
    assert told.worker_seconds == 130 and told.estimated_usd == 0.13 and told.tokens == 4400

    gone = worker(0, "Failed", end=130, exit_code=ExitCode.PREEMPTED, message=final0)
    job.run([gone, worker(1, start=140)], at(200), progress=record(startup_seconds=8.0, productive_seconds=30.0))
    final1 = record("done", startup_seconds=8.0, productive_seconds=60.0, checkpoint_blocked_seconds=2.0)
    job.run([gone, worker(1, "Succeeded", start=140, end=230, message=final1)], at(230))
    assert job.manifest["status"]["phase"] == "Succeeded"
    g = job.goodput
    assert g["productiveSeconds"] == 170 and g["startupSeconds"] == 10 and g["checkpointBlockedSeconds"] == 7
    assert g["lostToPreemptionSeconds"] == 8  # attempt 1's start-up; the SIGTERM checkpoint lost no step
    assert job.cost["workerSeconds"] == 130 + 90
    assert g["otherSeconds"] == 220 - 170 - 10 - 7 - 8
    assert g["pendingSeconds"] == 10  # each pod waited 5 s for its container
    assert g["ratio"] == round(170 / 220, 4)
    assert g["productiveUsd"] == "0.170000" and g["lostToPreemptionUsd"] == "0.008000"
    assert job.cost["tokens"] == 4400 and job.cost["usdPerMillionTokens"] == f"{0.22 / 4400 * 1e6:.4f}"


def test_a_kill_without_sigterm_counts_the_recomputed_steps_and_the_vanished_attempt_keeps_its_facts():
    job = Job(resources={"workers": 2})
    job.run()
    job.run([worker(0)], at(0))
    job.run([worker(0), worker(0, rank=1)], at(10))
    job.run([worker(0), worker(0, rank=1)], at(120), progress=record(**FACTS_A0))
    d = job.run([], at(130))  # both pods gone with their node: no final record
    assert job.manifest["status"]["preemptions"] == 1 and d.create_pods == [(1, 0)]
    facts1 = dict(startup_seconds=8.0, productive_seconds=40.0, recomputed_seconds=20.0)
    job.run([worker(1, start=140)], at(200), progress=record(**facts1))
    g = job.goodput
    assert g["productiveSeconds"] == 2 * 140  # two workers: rank 0's seconds count twice
    assert g["startupSeconds"] == 2 * 10 and g["checkpointBlockedSeconds"] == 2 * 5
    assert g["lostToPreemptionSeconds"] == 2 * (8 + 20)  # restart overhead + the steps trained again


def test_a_restart_after_a_failure_is_start_up_not_lost_to_preemption():
    job = Job()
    first_attempt(job)
    failed = worker(0, "Failed", end=130, exit_code=ExitCode.RETRIABLE, message=record("failed", **FACTS_A0))
    d = job.run([failed], at(130))
    assert job.manifest["status"]["restarts"] == 1 and d.create_pods == [(1, 0)]
    assert not JobCostSoFar.model_validate_json(d.job_cost or "").after_preemption
    job.run([failed, worker(1, start=140)], at(200), progress=record(startup_seconds=9.0, productive_seconds=20.0))
    assert job.goodput["startupSeconds"] == 19 and job.goodput["lostToPreemptionSeconds"] == 0


def test_a_job_never_preempted_loses_nothing_to_preemption():
    job = Job()
    first_attempt(job)
    done = record("done", **{**FACTS_A0, "productive_seconds": 150.0}, tokens_seen=5000)
    job.run([worker(0, "Succeeded", end=180, message=done)], at(180))
    g = job.goodput
    assert job.manifest["status"]["phase"] == "Succeeded"
    assert g["lostToPreemptionSeconds"] == 0 and g["productiveSeconds"] == 150 and g["ratio"] == round(150 / 180, 4)


def test_a_cpu_job_accrues_cpu_core_hours_and_no_gpu_hours():
    job = Job(resources={"cpu": "4"})
    first_attempt(job)
    assert job.cost["gpuHours"] == 0 and job.cost["workerSeconds"] == 120
    assert job.cost["cpuCoreHours"] == round(4 * 120 / 3600, 6)


def test_an_operator_restart_mid_attempt_adds_nothing_twice():
    job = Job()
    first_attempt(job)
    before = json.loads(json.dumps(job.cost))
    # A new operator reads the same status and sees the same pod and record at the same time.
    job.run([worker(0)], at(120), progress=record(**FACTS_A0))
    assert job.cost == before
    # ... and an older record of the same attempt (a stale poll) moves nothing back.
    job.run([worker(0)], at(121), progress=record(startup_seconds=10.0, productive_seconds=50.0))
    assert job.goodput["productiveSeconds"] == 100


def test_a_status_from_before_goodput_is_read_and_completed():
    old = {
        "phase": "Running",
        "attempt": 1,
        "preemptions": 1,
        "restarts": 0,
        "workers": [{"name": "j-a1-w0", "rank": 0, "phase": "Running", "attempt": 1}],
        "cost": {"gpuHours": 0.5, "estimatedUsd": "1.8000", "accruedUntil": "2026-11-22T12:00:00Z"},
    }
    job = Job(status=old, resources={"gpus": 2}, preflight={"estimate": False})
    job.run([worker(1, start=-60)], at(60), progress=record(startup_seconds=8.0, productive_seconds=30.0))
    assert job.cost["workerSeconds"] == 900 + 60  # 0.5 GPU-hours on 2 GPUs, then one more minute
    assert job.goodput["lostToPreemptionSeconds"] == 8  # after a preemption, by the counters
    assert job.goodput["productiveSeconds"] == 30 and job.cost["gpuHours"] == round(0.5 + 2 * 60 / 3600, 6)


def test_the_pod_carries_the_totals_so_far_in_one_contract_env_var():
    cost = {"workerSeconds": 100.0, "estimatedUsd": "0.1000", "tokens": 7, "goodput": {"pendingSeconds": 3.0}}
    cost["ledger"] = goodput.note(None, 0, {"productiveSeconds": 40.0, "startupSeconds": 5.0}, 1, False)
    spec = Job(capacity={"policy": "on-demand"}).spec
    price = lambda node, res: 2.0 if node.capacity_type == "on-demand" else 1.0  # noqa: E731
    value = goodput.job_cost_env(cost, spec, 1, False, price)
    manifest = Job().manifest
    pod = render.worker_pod(manifest, spec, Settings(), 1, 0, "10.0.0.1", job_cost=value)
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    told = JobCostSoFar.model_validate_json(env[envvars.JOB_COST])
    assert told.usd_per_worker_hour == 2.0 and told.goodput.productive_seconds == 40 and told.tokens == 7
    assert told.goodput.pending_seconds == 3 and told.estimated_usd == 0.1
