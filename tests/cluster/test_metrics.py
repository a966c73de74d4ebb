"""The operator's metrics as a real Prometheus scrapes them: a GPU job on a (kwok) spot node is
evicted once, resumes and succeeds, and PromQL over the scraped series agrees with the job's
status: one preemption, the GPU-seconds, worker time, goodput and dollars of status.cost, the info
series joining."""

from __future__ import annotations

import time

import pytest

from kubetune_contract.progress import ProgressRecord
from kubetune_dev.jobs import job_manifest
from kubetune_operator.metrics import GOODPUT_CATEGORIES
from tests.fixtures.control_plane import wait_for

from .jobs import Jobs
from .test_operator import evict, finish_pod, phase, running_pod, s3_port  # noqa: F401  (s3_port: a fixture)

pytestmark = pytest.mark.cluster
RUN_SECONDS = 4  # how long the resumed pod "trains" before it exits
# What the resumed trainer says at exit: its goodput facts (the evicted attempt sent none: kwok's
# pods answer no /progress) and the tokens trained.
FINAL = ProgressRecord(
    phase="done",
    step=120,
    total_steps=120,
    tokens_seen=12_000,
    startup_seconds=1.0,
    productive_seconds=2.0,
    checkpoint_blocked_seconds=0.25,
    recomputed_seconds=0.0,
)


@pytest.fixture
def jobs(kube_api, namespace, operator) -> Jobs:
    j = Jobs(kube_api, namespace)
    j.secret()
    return j


def finish_keeping_start(jobs: Jobs, pod_name: str, record: ProgressRecord) -> None:
    """The trainer container exits 0 after running since kwok started it (its real startedAt,
    so the run is paid for)."""
    pod = jobs.core.read_namespaced_pod(pod_name, jobs.ns)
    started = pod.status.container_statuses[0].state.running.started_at
    finish_pod(jobs, pod_name, 0, record, started_at=started.strftime("%Y-%m-%dT%H:%M:%SZ"))


def test_prometheus_sees_the_cost_and_preemption_of_a_job(jobs, s3_port, fake_nodes, operator, prometheus):  # noqa: F811
    prom = prometheus({"kubetune-operator": [f"127.0.0.1:{operator.metrics_port}"]})
    prom.wait_for_targets()
    node = fake_nodes(spot=True, gpus=8, gpu_type="NVIDIA-L4")
    name, ns = "metered", jobs.ns
    sel = f'job_namespace="{ns}",finetunejob="{name}"'
    jobs.create(
        job_manifest(
            name=name,
            resources={"gpus": 2, "gpuType": "NVIDIA-L4"},
            preflight={"estimate": False},  # sized elsewhere (test_sizing)
            s3={"endpoint": f"http://127.0.0.1:{s3_port}"},
        )
    )
    running_pod(jobs, name)
    evict(jobs, f"{name}-a0-w0")  # a spot reclaim as a node drainer does it
    running_pod(jobs, name, attempt=1)

    # While it runs: the pod-info series names the pod and its node, as the job's status does.
    pod_info = f'kubetune_job_pod_info{{{sel},worker_pod="{name}-a1-w0"}}'
    wait_for(lambda: prom.query(pod_info), timeout=30, what="pod info scraped")
    (series,) = prom.query(pod_info)
    assert series["metric"]["worker_node"] == node and series["metric"]["capacity_type"] == "spot"
    assert series["metric"]["job"] == "kubetune-operator"  # the target's own label, not overwritten

    time.sleep(RUN_SECONDS)
    finish_keeping_start(jobs, f"{name}-a1-w0", FINAL)
    wait_for(lambda: phase(jobs, name) == "Succeeded", what="Succeeded after a preemption")
    cost = jobs.status(name)["cost"]

    def scraped_final() -> bool:
        usd = prom.value(f"kubetune_job_cost_usd_total{{{sel}}}")
        succeeded = prom.value('kubetune_jobs{phase="Succeeded"}') or 0
        return usd is not None and abs(usd - float(cost["estimatedUsd"])) < 1e-9 and succeeded >= 1

    wait_for(scraped_final, timeout=30, what="the final status scraped")
    cost = jobs.status(name)["cost"]  # (unchanged since: the job is finished)
    print(f"status.cost: {cost}")  # in the report of a failure

    assert prom.value(f"kubetune_job_preemptions_total{{{sel}}}") == 1
    assert prom.value(f"kubetune_job_restarts_total{{{sel}}}") == 0
    spot = prom.value(f'kubetune_job_gpu_seconds_total{{{sel},capacity_type="spot"}}')
    on_demand = prom.value(f'kubetune_job_gpu_seconds_total{{{sel},capacity_type="on-demand"}}')
    assert spot == pytest.approx(cost["spotGpuHours"] * 3600, abs=0.01)
    assert on_demand == pytest.approx(cost["onDemandGpuHours"] * 3600, abs=0.01) and on_demand == 0
    total = prom.value(f"sum(kubetune_job_gpu_seconds_total{{{sel}}})")
    assert total == pytest.approx(cost["gpuHours"] * 3600, abs=0.01)
    assert total >= 2 * (RUN_SECONDS - 1)  # two GPUs, for at least the resumed pod's run
    usd = prom.value(f"kubetune_job_cost_usd_total{{{sel}}}")
    would_be = prom.value(f"kubetune_job_on_demand_cost_usd_total{{{sel}}}")
    assert usd == pytest.approx(float(cost["estimatedUsd"]), abs=1e-4)
    assert would_be == pytest.approx(float(cost["onDemandUsd"]), abs=1e-4)
    assert would_be > usd > 0  # spot savings: L4 spot vs on-demand prices
    assert prom.value(f"kubetune_job_progress_ratio{{{sel}}}") == 1

    # Goodput: the counters are status.cost's; the resumed attempt's start-up was lost to the preemption.
    g = cost["goodput"]
    assert g["lostToPreemptionSeconds"] == 1.0 and g["startupSeconds"] == 0  # (attempt 0 reported nothing)
    assert g["productiveSeconds"] == 2.0 and g["checkpointBlockedSeconds"] == 0.25
    worker = prom.value(f"kubetune_job_worker_seconds_total{{{sel}}}")
    assert worker == pytest.approx(cost["workerSeconds"], abs=0.01) and worker >= RUN_SECONDS - 1
    assert total == pytest.approx(2 * worker, abs=0.01)  # two GPUs per worker
    assert prom.value(f"kubetune_job_cpu_core_seconds_total{{{sel}}}") == pytest.approx(
        cost["cpuCoreHours"] * 3600, abs=0.02
    )
    for category, field in GOODPUT_CATEGORIES.items():
        scraped = prom.value(f'kubetune_job_goodput_seconds_total{{{sel},category="{category}"}}')
        assert scraped == pytest.approx(g[field], abs=0.001), category
    assert prom.value(f"kubetune_job_pending_seconds_total{{{sel}}}") == pytest.approx(g["pendingSeconds"], abs=0.001)
    assert prom.value(f"kubetune_job_tokens_total{{{sel}}}") == cost["tokens"] == 12_000
    assert prom.value(f"kubetune_job_goodput_ratio{{{sel}}}") == pytest.approx(g["ratio"], abs=1e-4)
    assert g["ratio"] == pytest.approx(2.0 / cost["workerSeconds"], abs=1e-4)
    assert g["otherSeconds"] == pytest.approx(cost["workerSeconds"] - 3.25, abs=0.01)
    lost_usd = prom.value(
        f'sum(kubetune_job_goodput_seconds_total{{{sel},category="lost_to_preemption"}}) '
        f"* sum(kubetune_job_cost_usd_total{{{sel}}}) / sum(kubetune_job_worker_seconds_total{{{sel}}})"
    )
    assert lost_usd == pytest.approx(float(g["lostToPreemptionUsd"]), abs=2e-6) and lost_usd > 0
    assert float(cost["usdPerMillionTokens"]) == pytest.approx(float(cost["estimatedUsd"]) / 12_000 * 1e6, abs=1e-3)
    assert prom.value(f"kubetune_job_eta_seconds{{{sel}}}") == 0

    # The info series join the job's series to its spec facts.
    joined = prom.query(
        f"kubetune_job_gpu_seconds_total{{{sel}}} * on(job_namespace, finetunejob) "
        "group_left(method, gpu_type, capacity_policy) kubetune_job_info"
    )
    assert {s["metric"]["capacity_type"] for s in joined} == {"spot", "on-demand"}
    assert {(s["metric"]["method"], s["metric"]["gpu_type"]) for s in joined} == {("lora", "NVIDIA-L4")}
    assert prom.value('kubetune_jobs{phase="Succeeded"}') >= 1

    # The operator's own health: its API calls and reconcile passes were counted.
    assert prom.value('sum(kubetune_api_requests_total{verb="patch",resource="finetunejobs/status",result="ok"})') > 0
    assert prom.value("sum(kubetune_reconcile_duration_seconds_count)") > 0
    assert prom.value(f'kubetune_pods_created_total{{job_namespace="{ns}"}}') == 2
    # Nothing was renamed to exported_* (no label of ours collides with a target label), and no
    # *_created side series arrived.
    every = prom.query('{__name__=~"kubetune_.+"}')
    assert every and not [s["metric"] for s in every if any(k.startswith("exported_") for k in s["metric"])]
    assert not prom.query('{__name__=~"kubetune_.+_created"}')
