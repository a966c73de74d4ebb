"""Every panel of the chart's Grafana dashboards, its variables expanded as Grafana would, queried on a
real Prometheus that scrapes the real operator while a GPU job on a (kwok) spot node is evicted once,
resumes and succeeds: no query errors; the panels built on the operator's series show that job, and
the cost panels the numbers of its status.cost. The trainer, DCGM and OpenCost panels are empty here
(no trainer runs on kwok, no exporter is scraped): "No data", not an error."""

from __future__ import annotations

import time

import pytest

from kubetune_dev.dashboard_queries import GPU_OR_EXTERNAL, TRAINER, last, panel_results, using
from kubetune_dev.jobs import job_manifest
from tests.fixtures.control_plane import wait_for

from .jobs import Jobs
from .test_metrics import FINAL, RUN_SECONDS, finish_keeping_start
from .test_operator import evict, phase, running_pod, s3_port  # noqa: F401  (s3_port: a fixture)

pytestmark = pytest.mark.cluster
# Series of other processes: empty on kwok (trainers on real nodes, the DCGM exporter, OpenCost).
ELSEWHERE = TRAINER + GPU_OR_EXTERNAL


@pytest.fixture
def jobs(kube_api, namespace, operator) -> Jobs:
    j = Jobs(kube_api, namespace)
    j.secret()
    return j


def test_every_dashboard_panel_queries_the_scraped_operator(jobs, s3_port, fake_nodes, operator, prometheus):  # noqa: F811
    start = time.time()
    prom = prometheus({"kubetune-operator": [f"127.0.0.1:{operator.metrics_port}"]})
    prom.wait_for_targets()
    fake_nodes(spot=True, gpus=8, gpu_type="NVIDIA-L4")
    name, ns = "charted", jobs.ns
    sel = {"job_namespace": ns, "finetunejob": name}
    jobs.create(
        job_manifest(
            name=name,
            resources={"gpus": 2, "gpuType": "NVIDIA-L4"},
            preflight={"estimate": False},  # sized elsewhere (test_sizing)
            s3={"endpoint": f"http://127.0.0.1:{s3_port}"},
        )
    )
    running_pod(jobs, name)
    # scraped before its preemption (a real job's take longer than a scrape interval): increase() sees it
    preemptions = f'kubetune_job_preemptions_total{{job_namespace="{ns}",finetunejob="{name}"}}'
    wait_for(lambda: prom.value(preemptions) == 0, timeout=30, what="the job scraped before its preemption")
    evict(jobs, f"{name}-a0-w0")
    running_pod(jobs, name, attempt=1)
    time.sleep(RUN_SECONDS)
    finish_keeping_start(jobs, f"{name}-a1-w0", FINAL)
    wait_for(lambda: phase(jobs, name) == "Succeeded", what="Succeeded after a preemption")
    cost = jobs.status(name)["cost"]
    usd_sel = f'kubetune_job_cost_usd_total{{job_namespace="{ns}",finetunejob="{name}"}}'
    wait_for(
        lambda: (prom.value(usd_sel) or -1) == pytest.approx(float(cost["estimatedUsd"]), abs=1e-9),
        timeout=30,
        what="the final status scraped",
    )
    print(f"status.cost: {cost}")
    time.sleep(2)  # the range queries' last 1 s step lands after the final scrape too

    # The variables: Grafana asks for the label values of kubetune_job_info.
    assert ns in prom.api("label/job_namespace/values", **{"match[]": "kubetune_job_info"})
    job_values = prom.api("label/finetunejob/values", **{"match[]": f'kubetune_job_info{{job_namespace=~"{ns}"}}'})
    assert job_values == [name]

    results = panel_results(prom, sel, start)  # PrometheusError on any failing query
    empty = sorted(key for key, r in results.items() if not r)
    elsewhere = using(ELSEWHERE)
    assert set(empty) == elsewhere, "operator panels without data, or other processes' panels with data"
    assert len(results) - len(elsewhere) >= 15 and elsewhere
    print(f"{len(results)} queries, {len(elsewhere)} empty (trainer, DCGM, OpenCost series)")

    # The numbers: what the panels show now is the job's status.
    def now(board: str, title: str, ref: str = "A") -> float:
        return last(results[board, title, ref])

    spot_h, on_demand_h = float(cost["spotGpuHours"]), float(cost["onDemandGpuHours"])
    usd, would_be = float(cost["estimatedUsd"]), float(cost["onDemandUsd"])
    by_capacity = {
        s["metric"]["capacity_type"]: float(s["value"][1]) for s in results["cost", "GPU-hours by capacity type", "A"]
    }
    assert by_capacity == {"spot": pytest.approx(spot_h, abs=1e-5), "on-demand": pytest.approx(on_demand_h, abs=1e-5)}
    assert spot_h > 0 and on_demand_h == 0
    assert now("cost", "Spot share of GPU time") == 1
    assert now("cost", "Accrued cost per job") == pytest.approx(usd, abs=1e-4)
    assert now("cost", "Accrued cost per namespace") == pytest.approx(usd, abs=1e-4)
    assert results["cost", "Accrued cost per namespace", "A"][0]["metric"] == {"job_namespace": ns}
    (by_gpu,) = results["cost", "Cost by GPU type", "A"]
    assert by_gpu["metric"] == {"gpu_type": "NVIDIA-L4"} and float(by_gpu["value"][1]) == pytest.approx(usd, abs=1e-4)
    assert now("cost", "Spot savings") == pytest.approx(would_be - usd, abs=1e-4) and would_be > usd
    assert now("cost", "Spot savings per job") == pytest.approx(would_be - usd, abs=1e-4)
    per_job = {
        s["metric"]["capacity_type"]: float(s["values"][-1][1])
        for s in results["cost", "GPU-hours per job and capacity type", "A"]
    }
    assert per_job == by_capacity
    assert now("cost", "Preemptions per job") == 1
    assert now("cost", "Preemptions in the time range") >= 1  # increase() extrapolates a little
    assert now("cost", "Spent in the time range") > 0
    assert now("utilization", "Progress") == 1
    g = cost["goodput"]
    breakdown = {
        s["metric"]["category"]: float(s["value"][1]) for s in results["utilization", "Goodput breakdown", "A"]
    }
    assert breakdown == {
        "productive": g["productiveSeconds"],
        "startup": g["startupSeconds"],
        "checkpoint_blocked": g["checkpointBlockedSeconds"],
        "lost_to_preemption": g["lostToPreemptionSeconds"],
    }
    assert now("utilization", "Goodput breakdown", "B") == pytest.approx(g["otherSeconds"], abs=0.01)
    assert now("utilization", "Goodput breakdown", "C") == pytest.approx(g["pendingSeconds"], abs=0.001)
    assert now("utilization", "Goodput ratio") == pytest.approx(g["ratio"], abs=1e-4)
    lost_usd = now("cost", "USD lost to preemption")
    assert lost_usd == pytest.approx(float(g["lostToPreemptionUsd"]), abs=2e-6) and lost_usd > 0
    assert now("cost", "Goodput USD") == pytest.approx(float(g["productiveUsd"]), abs=2e-6)
    assert now("cost", "Goodput USD", "B") == pytest.approx(usd, abs=1e-4)
    assert now("cost", "USD per 1M tokens") == pytest.approx(float(cost["usdPerMillionTokens"]), abs=1e-3)
    assert now("cost", "CPU core-hours per job") == pytest.approx(cost["cpuCoreHours"], abs=1e-5)
    assert now("utilization", "ETA") == 0
    phases = {s["metric"]["phase"]: float(s["value"][1]) for s in results["utilization", "Jobs by phase", "A"]}
    assert phases["Succeeded"] >= 1 and "Running" in phases

    # Another job selected: the job's panels are empty, not another job's.
    other = panel_results(prom, {"job_namespace": ns, "finetunejob": "someone-else"}, start)
    assert not other["cost", "Accrued cost per job", "A"] and not other["utilization", "Progress", "A"]
