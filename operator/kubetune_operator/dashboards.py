"""kubetune's Grafana dashboards, Utilization and Cost, as plain Python: the one source of the JSON the
chart ships (charts/kubetune/dashboards/*.json, written by `python -m kubetune_operator.crdgen`; a
unit test fails when they drift). The chart's `dashboards.enabled` renders them as ConfigMaps for
Grafana's dashboard sidecar; the JSON files also import as they are.

Every panel queries the `${datasource}` Prometheus and filters by the `job_namespace` and
`finetunejob` variables (label values of `kubetune_job_info`). Series of optional exporters (the
trainer's NVML gauges, NVIDIA's DCGM exporter, OpenCost) are joined to jobs through
`kubetune_job_pod_info`: without them the panel shows "No data", never an error. `expand()` turns a
panel's expression into the concrete PromQL Grafana would send, for the tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .dashboard_goodput import cost_panels, utilization_panels
from .dashboard_parts import (
    BY_JOB,
    JOB,
    JOB_LEGEND,
    NO_DCGM,
    NO_GPU,
    NO_OPENCOST,
    NO_TRAINER,
    by_node,
    dashboard,
    dcgm_job,
    node_join,
    panel,
    row,
    target,
)

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = REPO / "charts" / "kubetune" / "dashboards"


def utilization() -> dict[str, Any]:

    trainer = f"{{{JOB}}}"
    return dashboard(
        "kubetune-utilization",
        "kubetune / Utilization",
        "FineTuneJobs' progress, throughput and GPU use, from the kubetune operator, its trainers and (when "
        "present) NVIDIA's DCGM exporter.",
        [
            row("Jobs"),
            panel(
                "Jobs by phase",
                "FineTuneJobs the operator knows, by status.phase (all namespaces).",
                "short",
                [target("max by (phase) (kubetune_jobs)", "{{phase}}", instant=True)],
                kind="bargauge",
                width=8,
                orientation="horizontal",
            ),
            panel(
                "Progress",
                "Optimizer steps done over steps planned (status.progress); 100% once Succeeded.",
                "percentunit",
                [target(f"max by ({BY_JOB}) (kubetune_job_progress_ratio{trainer})", instant=True)],
                kind="bargauge",
                width=8,
                orientation="horizontal",
            ),
            panel(
                "ETA",
                "The trainer's estimate of the time left (status.progress.estimatedRemainingSeconds); 0 once "
                "Succeeded.",
                "s",
                [target(f"max by ({BY_JOB}) (kubetune_job_eta_seconds{trainer})", instant=True)],
                kind="stat",
                width=8,
            ),
            row("Training"),
            panel(
                "Throughput",
                "Tokens trained per second over the trainer's last logging window, all ranks (rank 0 reports).",
                "suffix: tok/s",
                [target(f"max by ({BY_JOB}) (kubetune_trainer_tokens_per_second{trainer})")],
                width=8,
                no_value=NO_TRAINER,
            ),
            panel(
                "Step rate",
                "Optimizer steps per second (rate of kubetune_trainer_step); drops to 0 while a checkpoint save or "
                "an evaluation pauses the step loop.",
                "suffix: steps/s",
                [target(f"max by ({BY_JOB}) (rate(kubetune_trainer_step{trainer}[$__rate_interval]))")],
                width=8,
                no_value=NO_TRAINER,
            ),
            panel(
                "Loss",
                "Training loss of the last logged step, and the last evaluation loss.",
                "none",
                [
                    target(f"max by ({BY_JOB}) (kubetune_trainer_loss{trainer})", f"{JOB_LEGEND} train"),
                    target(f"max by ({BY_JOB}) (kubetune_trainer_eval_loss{trainer})", f"{JOB_LEGEND} eval", ref="B"),
                ],
                width=8,
                no_value=NO_TRAINER,
            ),
            panel(
                "Time blocked by checkpoint saves",
                "Share of wall time that save_async() held up training (kubetune_checkpoint_blocked_seconds: "
                "waiting for the previous upload, staging).",
                "percentunit",
                [
                    target(
                        f"sum by ({BY_JOB}) (rate(kubetune_checkpoint_blocked_seconds_sum{trainer}[$__rate_interval]))"
                    )
                ],
                no_value=NO_TRAINER,
            ),
            panel(
                "Checkpoint blocked time, p95",
                "95th percentile of the time one checkpoint save held up training.",
                "s",
                [
                    target(
                        "histogram_quantile(0.95, sum by (job_namespace, finetunejob, le) "
                        f"(rate(kubetune_checkpoint_blocked_seconds_bucket{trainer}[$__rate_interval])))"
                    )
                ],
                no_value=NO_TRAINER,
            ),
            *utilization_panels(),
            row("GPUs"),
            panel(
                "GPU utilization per job (NVML)",
                "Mean utilization of the job's GPUs, as each trainer reads it from NVML at scrape time.",
                "percentunit",
                [target(f"avg by ({BY_JOB}) (kubetune_trainer_gpu_utilization_ratio{trainer})")],
                no_value=NO_GPU,
            ),
            panel(
                "GPU memory used per job (NVML)",
                "GPU memory in use, summed over the job's GPUs.",
                "bytes",
                [target(f"sum by ({BY_JOB}) (kubetune_trainer_gpu_memory_used_bytes{trainer})")],
                no_value=NO_GPU,
            ),
            panel(
                "GPU memory used per GPU (NVML)",
                "Share of each GPU's memory in use: headroom for a larger batch, or the next OOM.",
                "percentunit",
                [
                    target(
                        f"kubetune_trainer_gpu_memory_used_bytes{trainer}\n/ kubetune_trainer_gpu_memory_total_bytes"
                        f"{trainer}",
                        f"{JOB_LEGEND} {{{{worker_pod}}}} GPU {{{{gpu}}}}",
                    )
                ],
                no_value=NO_GPU,
            ),
            panel(
                "GPU utilization per node (NVML)",
                "Mean utilization of the GPUs the selected jobs' trainers use, by node (worker_node).",
                "percentunit",
                [target(f"avg by (worker_node) (kubetune_trainer_gpu_utilization_ratio{trainer})", "{{worker_node}}")],
                no_value=NO_GPU,
            ),
            panel(
                "GPU utilization per job (DCGM)",
                "DCGM_FI_DEV_GPU_UTIL of the GPUs the DCGM exporter assigns to the job's worker pods (its "
                "Kubernetes pod mapping), joined through kubetune_job_pod_info.",
                "percentunit",
                [target(dcgm_job("DCGM_FI_DEV_GPU_UTIL", " / 100"))],
                no_value=NO_DCGM,
            ),
            panel(
                "Tensor core activity per job (DCGM)",
                "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE (share of cycles the tensor pipes are busy) of the job's GPUs: "
                "high utilization with low tensor activity means the GPU waits on memory or small kernels.",
                "percentunit",
                [target(dcgm_job("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"))],
                no_value=NO_DCGM,
            ),
            panel(
                "GPU utilization of the jobs' nodes (DCGM)",
                "Mean DCGM_FI_DEV_GPU_UTIL of every GPU on each node the job's pods run on (the exporter's "
                "Hostname, or a node label, read as worker_node): includes other workloads on a shared node.",
                "percentunit",
                [target(node_join(by_node("DCGM_FI_DEV_GPU_UTIL", " / 100")), f"{JOB_LEGEND} {{{{worker_node}}}}")],
                width=24,
                no_value=NO_DCGM,
            ),
        ],
    )


def cost() -> dict[str, Any]:

    sel = f"{{{JOB}}}"
    usd = f"max by ({BY_JOB}) (kubetune_job_cost_usd_total{sel})"
    return dashboard(
        "kubetune-cost",
        "kubetune / Cost",
        "What FineTuneJobs cost at the operator's price table (status.cost), on spot and on-demand capacity, "
        "what spot saved, the preemptions it took, and OpenCost's node prices when present.",
        [
            row("Spend"),
            panel(
                "Accrued cost per job",
                "Estimated USD so far (status.cost.estimatedUsd), at the operator's price table (cost.gpuPrices).",
                "currencyUSD",
                [target(usd, instant=True)],
                kind="bargauge",
                orientation="horizontal",
                width=8,
            ),
            panel(
                "Accrued cost per namespace",
                "Estimated USD so far of the selected jobs, summed by namespace.",
                "currencyUSD",
                [target(f"sum by (job_namespace) ({usd})", "{{job_namespace}}", instant=True)],
                kind="bargauge",
                orientation="horizontal",
                width=8,
            ),
            panel(
                "Spent in the time range",
                "Increase of the estimated cost over the dashboard's time range, all selected jobs.",
                "currencyUSD",
                [target(f"sum(increase(kubetune_job_cost_usd_total{sel}[$__range]))", "spent", instant=True)],
                kind="stat",
                width=8,
            ),
            panel(
                "Spend rate",
                "USD per hour the selected jobs are accruing now.",
                "suffix: USD/h",
                [target(f"sum by ({BY_JOB}) (rate(kubetune_job_cost_usd_total{sel}[$__rate_interval])) * 3600")],
            ),
            panel(
                "Cost by GPU type",
                "Accrued USD by the jobs' spec.resources.gpuType (empty: none requested).",
                "currencyUSD",
                [
                    target(
                        f"sum by (gpu_type) (\n{usd}\n* on(job_namespace, finetunejob) group_left(gpu_type)\n"
                        f"max by ({BY_JOB}, gpu_type) (kubetune_job_info{sel})\n)",
                        "{{gpu_type}}",
                        instant=True,
                    )
                ],
                kind="bargauge",
                orientation="horizontal",
            ),
            row("Spot"),
            panel(
                "GPU-hours by capacity type",
                "GPU time of the jobs' worker containers on spot and on on-demand nodes (status.cost."
                "spotGpuHours, onDemandGpuHours).",
                "suffix: GPU-h",
                [
                    target(
                        f"sum by (capacity_type) (kubetune_job_gpu_seconds_total{sel}) / 3600",
                        "{{capacity_type}}",
                        instant=True,
                    )
                ],
                kind="stat",
                width=8,
            ),
            panel(
                "Spot share of GPU time",
                "Share of the selected jobs' GPU-hours that ran on spot nodes.",
                "percentunit",
                [
                    target(
                        f'sum(kubetune_job_gpu_seconds_total{{{JOB}, capacity_type="spot"}})\n'
                        f"/ sum(kubetune_job_gpu_seconds_total{sel})",
                        "spot",
                        instant=True,
                    )
                ],
                kind="stat",
                width=8,
            ),
            panel(
                "Spot savings",
                "What the same worker time would have cost on on-demand nodes of the same GPU type, minus the "
                "estimated cost (status.cost.onDemandUsd - estimatedUsd), all selected jobs.",
                "currencyUSD",
                [
                    target(
                        f"sum(\nmax by ({BY_JOB}) (kubetune_job_on_demand_cost_usd_total{sel})\n- {usd}\n)",
                        "saved",
                        instant=True,
                    )
                ],
                kind="stat",
                width=8,
            ),
            panel(
                "GPU-hours per job and capacity type",
                "Each job's GPU-hours on spot and on on-demand nodes, over time.",
                "suffix: GPU-h",
                [
                    target(
                        f"sum by ({BY_JOB}, capacity_type) (kubetune_job_gpu_seconds_total{sel}) / 3600",
                        f"{JOB_LEGEND} {{{{capacity_type}}}}",
                    )
                ],
            ),
            panel(
                "Spot savings per job",
                "On-demand cost minus estimated cost, per job, over time.",
                "currencyUSD",
                [
                    target(
                        f"max by ({BY_JOB}) (kubetune_job_on_demand_cost_usd_total{sel})\n- {usd}",
                    )
                ],
            ),
            panel(
                "Preemptions per job",
                "Preemptions each job absorbed (evictions, spot reclaims, node loss): each loses the steps since its "
                "last checkpoint and a restart.",
                "short",
                [target(f"max by ({BY_JOB}) (kubetune_job_preemptions_total{sel})")],
            ),
            panel(
                "Preemptions in the time range",
                "Preemptions of the selected jobs over the dashboard's time range.",
                "short",
                [target(f"sum(increase(kubetune_job_preemptions_total{sel}[$__range]))", "preemptions", instant=True)],
                kind="stat",
            ),
            *cost_panels(),
            row("OpenCost"),
            panel(
                "OpenCost GPU price of the jobs' nodes",
                "OpenCost's node_gpu_hourly_cost (USD per GPU-hour) of each node the job's pods run on, to compare "
                "with the operator's price table (cost.gpuPrices).",
                "suffix: USD/GPU-h",
                [target(node_join(by_node("node_gpu_hourly_cost")), f"{JOB_LEGEND} {{{{worker_node}}}}")],
                no_value=NO_OPENCOST,
            ),
            panel(
                "OpenCost vs kubetune, USD per hour",
                "The job's GPUs in use (rate of kubetune_job_gpu_seconds_total) at OpenCost's mean GPU price of its "
                "nodes, next to the operator's own estimate.",
                "suffix: USD/h",
                [
                    target(
                        f"sum by ({BY_JOB}) (rate(kubetune_job_gpu_seconds_total{sel}[$__rate_interval]))\n"
                        f"* on(job_namespace, finetunejob)\navg by ({BY_JOB}) (\n"
                        f"{node_join(by_node('node_gpu_hourly_cost'))}\n)",
                        f"{JOB_LEGEND} OpenCost",
                    ),
                    target(
                        f"sum by ({BY_JOB}) (rate(kubetune_job_cost_usd_total{sel}[$__rate_interval])) * 3600",
                        f"{JOB_LEGEND} kubetune",
                        ref="B",
                    ),
                ],
                no_value=NO_OPENCOST,
            ),
        ],
    )


DASHBOARDS = {"utilization": utilization, "cost": cost}


# ---- for the tests ------------------------------------------------------------------------------------
def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that queries (not the rows)."""
    for p in board["panels"]:
        if p["type"] != "row":
            yield p


def expand(expr: str, values: dict[str, str] | None = None, *, rate_interval: str = "1m", range_: str = "1h") -> str:
    """The PromQL Grafana sends for `expr`: dashboard variables (default: All, i.e. `.*`) and Grafana's
    own ($__rate_interval, $__interval, $__range) replaced by concrete values."""
    builtins = {"__rate_interval": rate_interval, "__interval": "15s", "__range": range_}
    variables = {"job_namespace": ".*", "finetunejob": ".*", **builtins, **(values or {})}

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return variables[name]

    # label_replace's "$1" is a capture group, not a variable: a variable's name starts with a letter or _.
    return re.sub(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)", sub, expr)


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2) + "\n"


def outputs() -> dict[Path, str]:
    return {DASHBOARDS_DIR / f"{name}.json": render(build()) for name, build in DASHBOARDS.items()}
