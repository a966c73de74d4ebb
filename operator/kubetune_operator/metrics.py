"""Operator metrics (prometheus-client). `kubetune_job_pod_info` is the join key between a job and
its pods/nodes; the trainer's own metrics come from the trainer pods.

Built at startup (one `OperatorMetrics` in the operator context), each with its own registry, so
importing this module registers nothing and two operators in one process do not collide."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class _JobsCollector(Collector):
    """Per-job gauges from the last status each job was reconciled to (bounded by the job count)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], dict[str, Any]] = {}

    def update(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        with self._lock:
            self._jobs[(namespace, name)] = status

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._jobs.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            jobs = dict(self._jobs)
        phases = GaugeMetricFamily("kubetune_jobs", "FineTuneJobs by phase.", labels=["phase"])
        counts: dict[str, int] = {}
        info = GaugeMetricFamily(
            "kubetune_job_pod_info",
            "Worker pods of a job (value 1).",
            labels=["namespace", "job", "pod", "node", "capacity_type"],
        )
        gpu_hours = GaugeMetricFamily("kubetune_job_gpu_hours", "GPU-hours used by a job.", labels=["namespace", "job"])
        usd = GaugeMetricFamily("kubetune_job_cost_usd", "Estimated cost of a job in USD.", labels=["namespace", "job"])
        progress = GaugeMetricFamily(
            "kubetune_job_progress_ratio", "Fraction of steps done (0-1).", labels=["namespace", "job"]
        )
        job_preemptions = GaugeMetricFamily(
            "kubetune_job_preemptions", "Preemptions a job has absorbed.", labels=["namespace", "job"]
        )
        for (ns, name), st in jobs.items():
            phase = st.get("phase") or "Pending"
            counts[phase] = counts.get(phase, 0) + 1
            for w in st.get("workers") or []:
                info.add_metric([ns, name, w["name"], w.get("node") or "", w.get("capacityType") or ""], 1)
            cost = st.get("cost") or {}
            gpu_hours.add_metric([ns, name], float(cost.get("gpuHours", 0)))
            usd.add_metric([ns, name], float(cost.get("estimatedUsd", 0)))
            pct = (st.get("progress") or {}).get("progressPercentage")
            if pct is not None:
                progress.add_metric([ns, name], pct / 100)
            job_preemptions.add_metric([ns, name], st.get("preemptions") or 0)
        for phase, n in sorted(counts.items()):
            phases.add_metric([phase], n)
        yield from (phases, info, gpu_hours, usd, progress, job_preemptions)


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
            "kubetune_reconcile_errors_total", "Reconciles that raised.", ["kind"], registry=r
        )
        self.preemptions = Counter(
            "kubetune_preemptions_total", "Trainer pods lost to preemption.", ["namespace"], registry=r
        )
        self.restarts = Counter(
            "kubetune_restarts_total", "Attempts restarted after a non-preemption failure.", ["namespace"], registry=r
        )
        self.pods_created = Counter("kubetune_pods_created_total", "Trainer pods created.", ["namespace"], registry=r)
        self.jobs = _JobsCollector()
        r.register(self.jobs)
