"""Operator metrics (prometheus-client): the contract documented in docs/metrics.md.

Names follow Prometheus' conventions: prefix `kubetune_`, base units (seconds, not hours), `_total`
on counters. No label is named like a target label that Prometheus or kube-prometheus-stack adds
(`job`, `namespace`, `pod`, `instance`, `service`, `container`, `endpoint`): a scrape would
rename ours to `exported_*` and break every join. Per-job series carry `job_namespace` and
`finetunejob`; worker series `worker_pod` and `worker_node`. `kubetune_job_info` and
`kubetune_job_pod_info` (value 1) are the join keys to the job's spec and to its pods and nodes.

Per-job series come from the last status each job was reconciled to (`JobsCollector`). The totals
of `status.cost`, `preemptions` and `restarts` only grow for a given job, so they are counters; a
job deleted and recreated under the same name starts again from 0, which is what a counter reset
means. Cardinality is bounded by jobs x workers: no step, no UID, no attempt label.

Built at startup (one `OperatorMetrics` in the operator context), each with its own registry, so
importing this module registers nothing and two operators in one process do not collide."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from . import api

JOB_LABELS = ["job_namespace", "finetunejob"]
PHASES: tuple[str, ...] = get_args(api.Phase)
CAPACITY_TYPES = ("spot", "on-demand")
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class JobInfo:
    """The spec facts `kubetune_job_info` carries (one series per job), and the job's budget
    (`kubetune_job_budget_*`, absent without one)."""

    model: str = ""
    method: str = ""
    gpu_type: str = ""
    capacity_policy: str = ""
    budget_usd: float | None = None
    budget_gpu_hours: float | None = None

    @classmethod
    def of(cls, spec: api.FineTuneJobSpec | None) -> JobInfo:
        if spec is None:
            return cls()
        return cls(
            model=spec.base_model.uri,
            method=spec.method,
            gpu_type=spec.resources.gpu_type or "",
            capacity_policy=spec.capacity.policy,
            budget_usd=spec.budget.max_usd if spec.budget else None,
            budget_gpu_hours=spec.budget.max_gpu_hours if spec.budget else None,
        )


def _float(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


class JobsCollector(Collector):
    """Per-job series from the last status (and spec facts) each job was reconciled to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], tuple[dict[str, Any], JobInfo]] = {}

    def update(self, namespace: str, name: str, status: dict[str, Any], info: JobInfo | None = None) -> None:
        with self._lock:
            previous = self._jobs.get((namespace, name))
            if info is None:
                info = previous[1] if previous else JobInfo()
            self._jobs[(namespace, name)] = (status, info)

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._jobs.pop((namespace, name), None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            jobs = dict(self._jobs)
        phases = GaugeMetricFamily("kubetune_jobs", "FineTuneJobs known to the operator, by phase.", labels=["phase"])
        info = GaugeMetricFamily(
            "kubetune_job_info",
            "A FineTuneJob's spec facts (value 1): join on job_namespace, finetunejob.",
            labels=[*JOB_LABELS, "model", "method", "gpu_type", "capacity_policy"],
        )
        pod_info = GaugeMetricFamily(
            "kubetune_job_pod_info",
            "A job's current worker pods and their nodes (value 1): join on job_namespace, finetunejob.",
            labels=[*JOB_LABELS, "worker_pod", "worker_node", "capacity_type", "rank"],
        )
        gpu_seconds = CounterMetricFamily(
            "kubetune_job_gpu_seconds",
            "GPU-seconds the job's worker containers ran, by node capacity type.",
            labels=[*JOB_LABELS, "capacity_type"],
        )
        usd = CounterMetricFamily(
            "kubetune_job_cost_usd", "Estimated cost of the job in USD (operator price table).", labels=JOB_LABELS
        )
        on_demand_usd = CounterMetricFamily(
            "kubetune_job_on_demand_cost_usd",
            "What the job's worker time would have cost on on-demand nodes, in USD (minus cost: spot savings).",
            labels=JOB_LABELS,
        )
        preemptions = CounterMetricFamily(
            "kubetune_job_preemptions", "Preemptions the job has absorbed.", labels=JOB_LABELS
        )
        restarts = CounterMetricFamily(
            "kubetune_job_restarts", "Restarts of the job after non-preemption failures.", labels=JOB_LABELS
        )
        progress = GaugeMetricFamily(
            "kubetune_job_progress_ratio", "Fraction of the job's steps done (0-1).", labels=JOB_LABELS
        )
        eta = GaugeMetricFamily(
            "kubetune_job_eta_seconds", "Estimated seconds until the job's training ends.", labels=JOB_LABELS
        )
        budget_usd = GaugeMetricFamily(
            "kubetune_job_budget_usd", "The job's spec.budget.maxUsd (absent without one).", labels=JOB_LABELS
        )
        budget_gpu_seconds = GaugeMetricFamily(
            "kubetune_job_budget_gpu_seconds",
            "The job's spec.budget.maxGpuHours in GPU-seconds (absent without one).",
            labels=JOB_LABELS,
        )
        counts = dict.fromkeys(PHASES, 0)
        for (ns, name), (st, spec_info) in sorted(jobs.items()):
            key = [ns, name]
            phase = st.get("phase") or "Pending"
            counts[phase] = counts.get(phase, 0) + 1
            info.add_metric([*key, spec_info.model, spec_info.method, spec_info.gpu_type, spec_info.capacity_policy], 1)
            for w in st.get("workers") or []:
                if w.get("phase") == "Creating":
                    continue  # not a pod yet
                labels = [w["name"], w.get("node") or "", w.get("capacityType") or "", str(w.get("rank", 0))]
                pod_info.add_metric([*key, *labels], 1)
            cost = st.get("cost") or {}
            spot_hours = _float(cost.get("spotGpuHours"))
            on_demand_hours = _float(cost.get("onDemandGpuHours", max(0.0, _float(cost.get("gpuHours")) - spot_hours)))
            gpu_seconds.add_metric([*key, "spot"], spot_hours * SECONDS_PER_HOUR)
            gpu_seconds.add_metric([*key, "on-demand"], on_demand_hours * SECONDS_PER_HOUR)
            usd.add_metric(key, _float(cost.get("estimatedUsd")))
            on_demand_usd.add_metric(key, _float(cost.get("onDemandUsd", cost.get("estimatedUsd"))))
            preemptions.add_metric(key, st.get("preemptions") or 0)
            restarts.add_metric(key, st.get("restarts") or 0)
            ratio = _progress_ratio(st)
            if ratio is not None:
                progress.add_metric(key, ratio)
            if spec_info.budget_usd is not None:
                budget_usd.add_metric(key, spec_info.budget_usd)
            if spec_info.budget_gpu_hours is not None:
                budget_gpu_seconds.add_metric(key, spec_info.budget_gpu_hours * SECONDS_PER_HOUR)
            remaining = (st.get("progress") or {}).get("estimatedRemainingSeconds")
            if remaining is not None:
                eta.add_metric(key, float(remaining))
        for phase, n in counts.items():
            phases.add_metric([phase], n)
        yield from (phases, info, pod_info, gpu_seconds, usd, on_demand_usd, preemptions, restarts, progress, eta)
        yield from (budget_usd, budget_gpu_seconds)
        yield from _goodput_families(jobs)


GOODPUT_CATEGORIES = {  # label value -> status.cost.goodput field ("other" is not monotone: worker - sum)
    "productive": "productiveSeconds",
    "startup": "startupSeconds",
    "checkpoint_blocked": "checkpointBlockedSeconds",
    "lost_to_preemption": "lostToPreemptionSeconds",
}


def _goodput_families(jobs: dict[tuple[str, str], tuple[dict[str, Any], JobInfo]]) -> Iterator[Metric]:
    """Worker time, CPU time, goodput by category, pending time, tokens (counters from status.cost)."""
    worker = CounterMetricFamily(
        "kubetune_job_worker_seconds",
        "Paid worker container-seconds of the job, all workers and attempts.",
        labels=JOB_LABELS,
    )
    cpu = CounterMetricFamily(
        "kubetune_job_cpu_core_seconds",
        "Requested CPU cores times the job's worker container time.",
        labels=JOB_LABELS,
    )
    goodput = CounterMetricFamily(
        "kubetune_job_goodput_seconds",
        "Worker-seconds of the job's paid time by goodput category (worker_seconds minus their sum: other).",
        labels=[*JOB_LABELS, "category"],
    )
    pending = CounterMetricFamily(
        "kubetune_job_pending_seconds",
        "Worker pods' creation to container start (scheduling, provisioning, image pull), summed over pods.",
        labels=JOB_LABELS,
    )
    tokens = CounterMetricFamily(
        "kubetune_job_tokens", "Tokens the job trained (steps trained twice count once).", labels=JOB_LABELS
    )
    ratio = GaugeMetricFamily(
        "kubetune_job_goodput_ratio", "Productive share of the job's paid worker time (0-1).", labels=JOB_LABELS
    )
    for (ns, name), (st, _) in sorted(jobs.items()):
        key = [ns, name]
        cost = st.get("cost") or {}
        g = cost.get("goodput") or {}
        worker_seconds = _float(cost.get("workerSeconds"))
        worker.add_metric(key, worker_seconds)
        cpu.add_metric(key, _float(cost.get("cpuCoreHours")) * SECONDS_PER_HOUR)
        for category, field in GOODPUT_CATEGORIES.items():
            goodput.add_metric([*key, category], _float(g.get(field)))
        pending.add_metric(key, _float(g.get("pendingSeconds")))
        tokens.add_metric(key, _float(cost.get("tokens")))
        if worker_seconds > 0:
            ratio.add_metric(key, _float(g.get("ratio")))
    yield from (worker, cpu, goodput, pending, tokens, ratio)


def _progress_ratio(status: dict[str, Any]) -> float | None:
    """step/totalSteps when both are known (finer than the integer percentage), else the percentage."""
    if status.get("phase") == "Succeeded":
        return 1.0
    prog = status.get("progress") or {}
    step, total = prog.get("step"), prog.get("totalSteps")
    if step is not None and total:
        return min(1.0, step / total)
    pct = prog.get("progressPercentage")
    return None if pct is None else pct / 100


class OperatorMetrics:
    """Every metric the operator exports, registered in `registry` (served by start_http_server)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # what the default registry has
                registry.register(standard)
        self.registry = r = registry
        self.reconcile_seconds = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Time to observe, decide and act for one FineTuneJob.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors_total",
            "Reconcile passes that failed, by kind (conflict, api, sweep).",
            ["kind"],
            registry=r,
        )
        self.api_requests = Counter(
            "kubetune_api_requests_total",
            "Kubernetes API requests the operator made (not kopf's watches), by verb, resource and result "
            "(ok, or the HTTP status code, or connection_error).",
            ["verb", "resource", "result"],
            registry=r,
        )
        self.pods_created = Counter(
            "kubetune_pods_created_total", "Trainer pods created, by job namespace.", ["job_namespace"], registry=r
        )
        self.jobs = JobsCollector()
        r.register(self.jobs)


def serve(metrics: OperatorMetrics, port: int) -> None:
    """Serve /metrics on `port` (all addresses). The Prometheus text format would carry each
    counter's and histogram's creation time as an extra `*_created` gauge series, outside the
    contract: the operator process turns those off (prometheus-client's switch is process-wide)."""
    disable_created_metrics()
    start_http_server(port, registry=metrics.registry)
