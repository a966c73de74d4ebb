"""The operator's metrics contract: what /metrics serves for a few jobs fed through the update
path, linted by the real `promtool check metrics`, and checked against docs/metrics.md."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_dev.prometheus import promtool_check_metrics
from kubetune_dev.versions import REPO
from kubetune_operator import api
from kubetune_operator.metrics import JobInfo, OperatorMetrics
from kubetune_trainer.checkpoint import _metrics_for
from kubetune_trainer.metrics import TrainerMetrics

# Target labels Prometheus (and kube-prometheus-stack's relabelings) put on every scraped series.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "container", "endpoint"}

RUNNING = {
    "phase": "Running",
    "attempt": 1,
    "preemptions": 1,
    "restarts": 0,
    "progress": {"step": 30, "totalSteps": 120, "progressPercentage": 25, "estimatedRemainingSeconds": 900},
    "cost": {
        "gpuHours": 1.5,
        "spotGpuHours": 1.0,
        "onDemandGpuHours": 0.5,
        "estimatedUsd": "2.8000",
        "onDemandUsd": "4.0500",
        "accruedUntil": "2026-11-22T12:00:00Z",
        "workerSeconds": 5400.0,
        "cpuCoreHours": 3.0,
        "tokens": 1_200_000,
        "usdPerMillionTokens": "2.3333",
        "goodput": {
            "productiveSeconds": 4000.0,
            "startupSeconds": 300.0,
            "checkpointBlockedSeconds": 100.0,
            "lostToPreemptionSeconds": 600.0,
            "otherSeconds": 400.0,
            "pendingSeconds": 45.0,
            "ratio": 0.7407,
            "productiveUsd": "2.074074",
            "lostToPreemptionUsd": "0.311111",
        },
    },
    "workers": [
        {"name": "a-a1-w0", "rank": 0, "attempt": 1, "phase": "Running", "node": "n1", "capacityType": "spot"},
        {"name": "a-a1-w1", "rank": 1, "attempt": 1, "phase": "Creating"},
    ],
}


def spec(**overrides: object) -> api.FineTuneJobSpec:
    from kubetune_dev.jobs import job_manifest

    return api.FineTuneJobSpec.model_validate(job_manifest(name="x", **overrides)["spec"])


@pytest.fixture
def metrics() -> OperatorMetrics:
    m = OperatorMetrics()
    gpu = spec(resources={"gpus": 1, "gpuType": "NVIDIA-L4"}, capacity={"policy": "spot"}, budget={"maxUsd": 3.5})
    m.jobs.update("team-a", "a", RUNNING, JobInfo.of(gpu))
    m.jobs.update("team-b", "b", {"phase": "Succeeded", "preemptions": 0, "restarts": 2}, JobInfo.of(spec()))
    m.jobs.update("team-b", "new", {}, None)  # first pass of a job whose spec did not parse
    m.reconcile_seconds.observe(0.02)
    m.reconcile_errors.labels("conflict").inc()
    m.api_requests.labels("patch", "finetunejobs/status", "ok").inc()
    m.api_requests.labels("get", "secrets", "404").inc()
    m.pods_created.labels(job_namespace="team-a").inc(2)
    return m


def exposition(m: OperatorMetrics) -> str:
    return generate_latest(m.registry).decode()


def samples(m: OperatorMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(exposition(m)):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_promtool_finds_nothing_to_lint(metrics):
    code, complaints = promtool_check_metrics(exposition(metrics))
    assert code == 0 and complaints.strip() == "", complaints


def test_no_label_is_named_like_a_target_label(metrics):
    for name, series in samples(metrics).items():
        if name.startswith("kubetune_"):
            for labels, _ in series:
                assert not TARGET_LABELS & set(labels), (name, labels)


def test_per_job_series_come_from_status_in_base_units(metrics):
    s = samples(metrics)
    a = {"job_namespace": "team-a", "finetunejob": "a"}

    def value(name: str, **labels: str) -> float:
        hits = [v for lab, v in s[name] if lab == {**a, **labels}]
        assert len(hits) == 1, (name, labels, s.get(name))
        return hits[0]

    assert value("kubetune_job_gpu_seconds_total", capacity_type="spot") == 3600
    assert value("kubetune_job_gpu_seconds_total", capacity_type="on-demand") == 1800
    assert value("kubetune_job_cost_usd_total") == 2.8 and value("kubetune_job_on_demand_cost_usd_total") == 4.05
    assert value("kubetune_job_preemptions_total") == 1 and value("kubetune_job_restarts_total") == 0
    assert value("kubetune_job_progress_ratio") == 0.25 and value("kubetune_job_eta_seconds") == 900
    assert value("kubetune_job_worker_seconds_total") == 5400 and value("kubetune_job_cpu_core_seconds_total") == 10800
    goodput = {lab["category"]: v for lab, v in s["kubetune_job_goodput_seconds_total"] if lab["finetunejob"] == "a"}
    assert goodput == {"productive": 4000, "startup": 300, "checkpoint_blocked": 100, "lost_to_preemption": 600}
    assert value("kubetune_job_pending_seconds_total") == 45 and value("kubetune_job_tokens_total") == 1_200_000
    assert value("kubetune_job_goodput_ratio") == 0.7407  # and absent for jobs without worker time:
    assert [lab["finetunejob"] for lab, _ in s["kubetune_job_goodput_ratio"]] == ["a"]
    assert value("kubetune_job_budget_usd") == 3.5  # and absent for the jobs without a budget:
    assert [lab["finetunejob"] for lab, _ in s["kubetune_job_budget_usd"]] == ["a"]
    assert "kubetune_job_budget_gpu_seconds" not in s
    info = value(
        "kubetune_job_info",
        model="s3://kubetune-demo/models/tiny-llama",
        method="lora",
        gpu_type="NVIDIA-L4",
        capacity_policy="spot",
    )
    assert info == 1
    # Only pods that exist: the one being created has no node to join to yet.
    assert [lab for lab, _ in s["kubetune_job_pod_info"]] == [
        {**a, "worker_pod": "a-a1-w0", "worker_node": "n1", "capacity_type": "spot", "rank": "0"}
    ]
    phases = {lab["phase"]: v for lab, v in s["kubetune_jobs"]}
    assert phases == {"Pending": 1, "Running": 1, "Restarting": 0, "Suspended": 0, "Succeeded": 1, "Failed": 0}
    b = {"job_namespace": "team-b", "finetunejob": "b"}
    assert ({**b}, 1.0) in s["kubetune_job_progress_ratio"]  # Succeeded is done, whatever the last step said
    assert ({**b}, 2.0) in s["kubetune_job_restarts_total"]


def test_a_gpu_hour_budget_is_exported_in_gpu_seconds():
    m = OperatorMetrics()
    m.jobs.update("ns", "g", RUNNING, JobInfo.of(spec(resources={"gpus": 2}, budget={"maxGpuHours": 1.5})))
    assert samples(m)["kubetune_job_budget_gpu_seconds"] == [({"job_namespace": "ns", "finetunejob": "g"}, 5400.0)]
    assert "kubetune_job_budget_usd" not in samples(m)


def test_a_deleted_job_stops_being_exported(metrics):
    metrics.jobs.forget("team-a", "a")
    assert not [lab for lab, _ in samples(metrics)["kubetune_job_cost_usd_total"] if lab["finetunejob"] == "a"]


def test_the_info_series_keeps_its_spec_facts_when_a_pass_has_no_spec(metrics):
    metrics.jobs.update("team-a", "a", {**RUNNING, "preemptions": 2})  # e.g. a pod_rejected write
    (labels,) = [lab for lab, _ in samples(metrics)["kubetune_job_info"] if lab["finetunejob"] == "a"]
    assert labels["gpu_type"] == "NVIDIA-L4"


def documented_names() -> set[str]:
    text = (REPO / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `(kubetune_[a-z_]+)`", text, flags=re.M))


def family_names(registry: CollectorRegistry) -> set[str]:
    out = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        # (`*_created` gauges: the served operator turns them off, see metrics.serve)
        created = family.type == "gauge" and family.name.endswith("_created")
        if family.name.startswith("kubetune_") and not created:
            out.add(family.name + ("_total" if family.type == "counter" else ""))
    return out


def test_docs_list_every_metric_and_no_other(metrics):
    trainer = TrainerMetrics()
    _metrics_for(trainer.registry)  # the checkpoint store's metrics share the trainer's registry
    for once_known in (trainer.startup_seconds, trainer.flops_per_token, trainer.mfu):  # absent until known
        trainer.known(once_known, 1.0)
    exported = family_names(metrics.registry) | family_names(trainer.registry)
    nvml = {
        "kubetune_trainer_gpu_utilization_ratio",
        "kubetune_trainer_gpu_memory_used_bytes",
        "kubetune_trainer_gpu_memory_total_bytes",
    }  # only where a GPU driver answers
    assert documented_names() == exported | nvml
