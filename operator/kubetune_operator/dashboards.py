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

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = REPO / "charts" / "kubetune" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Label matchers of a job's series, and of a job's worker series.
JOB = 'job_namespace=~"$job_namespace", finetunejob=~"$finetunejob"'
BY_JOB = "job_namespace, finetunejob"
JOB_LEGEND = "{{job_namespace}}/{{finetunejob}}"


def _dcgm_by_pod(metric: str) -> str:
    """A DCGM exporter series per GPU with the pod it is assigned to as `job_namespace`/`worker_pod`.
    With the exporter's pod mapping, a ServiceMonitor without honorLabels renames its `pod` and
    `namespace` to `exported_*`; with honorLabels they stay: both are tried (the exporter's own pod
    never matches a trainer pod, so the wrong guess drops out of the join)."""
    arms = [
        f'label_replace(label_replace({metric}, "worker_pod", "$1", "{pod}", "(.+)"), '
        f'"job_namespace", "$1", "{ns}", "(.+)")'
        for pod, ns in (("exported_pod", "exported_namespace"), ("pod", "namespace"))
    ]
    return f"({arms[0]} or {arms[1]})"


def _job_pods() -> str:
    return f'max by ({BY_JOB}, worker_pod) (kubetune_job_pod_info{{{JOB}, worker_pod!=""}})'


def _job_nodes() -> str:
    return f'max by ({BY_JOB}, worker_node) (kubetune_job_pod_info{{{JOB}, worker_node!=""}})'


def _dcgm_job(metric: str, scale: str = "") -> str:
    """Mean of a DCGM gauge over the GPUs assigned to each job's worker pods."""
    return (
        f"avg by ({BY_JOB}) (\n  {_dcgm_by_pod(metric)}{scale}\n"
        f"  * on(job_namespace, worker_pod) group_left(finetunejob)\n  {_job_pods()}\n)"
    )


def _node_join(node_series: str) -> str:
    """A per-node value (by `worker_node`) for each node a job's pods run on."""
    return f"{_job_nodes()}\n* on(worker_node) group_left()\n{node_series}"


def _by_node(metric: str, scale: str = "") -> str:
    """Mean of a node exporter's per-GPU gauge by node, its `Hostname` (DCGM: the node name) or `node`
    label read as `worker_node`."""
    arms = " or ".join(
        f'label_replace({metric}, "worker_node", "$1", "{label}", "(.+)")' for label in ("Hostname", "node")
    )
    return f"avg by (worker_node) ({arms}){scale}"


# ---- panels ------------------------------------------------------------------------------------------
def target(expr: str, legend: str = JOB_LEGEND, *, instant: bool = False, ref: str = "A") -> dict[str, Any]:
    out: dict[str, Any] = {"refId": ref, "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
    if instant:
        out.update(instant=True, range=False)
    return out


def panel(
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, Any]],
    *,
    kind: str = "timeseries",
    width: int = 12,
    height: int = 8,
    no_value: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    if unit == "percentunit":
        defaults.update(min=0, max=1)
    if no_value:
        defaults["noValue"] = no_value
    out: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": height},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": targets,
    }
    if kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    else:
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    out["options"].update(options)
    return out


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": 24, "h": 1}, "panels": []}


def _layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids and grid positions: panels fill rows of 24 columns left to right."""
    x = y = row_height = 0
    for i, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24 or p["type"] == "row":
            x, y, row_height = 0, y + row_height, 0
        p["id"] = i
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x, row_height = x + w, max(row_height, h)
        if p["type"] == "row":
            x, y, row_height = 0, y + h, 0
    return panels


def _variables() -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "type": "query",
            "name": name,
            "label": label,
            "datasource": DATASOURCE,
            "query": query,  # a string: what every Grafana version since 7 reads
            "definition": query,
            "refresh": 2,  # on time range change: new jobs appear
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Prometheus",
            "query": "prometheus",
            "refresh": 1,
            "current": {},
        },
        query_var("job_namespace", "Namespace", "label_values(kubetune_job_info, job_namespace)"),
        query_var(
            "finetunejob",
            "FineTuneJob",
            'label_values(kubetune_job_info{job_namespace=~"$job_namespace"}, finetunejob)',
        ),
    ]


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["kubetune"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "templating": {"list": _variables()},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["kubetune"], "title": "kubetune", "asDropdown": True, "includeVars": True}
        ],
        "panels": _layout(panels),
    }


NO_TRAINER = "No data (no trainer metrics: the PodMonitor, metrics.podMonitor.enabled)"
NO_GPU = "No data (no GPU: NVML series come from trainers on GPU nodes)"
NO_DCGM = "No data (no DCGM exporter series)"
NO_OPENCOST = "No data (no OpenCost series)"


def utilization() -> dict[str, Any]:
    from .dashboard_goodput import utilization_panels  # (it builds on this module's parts)

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
                [target(_dcgm_job("DCGM_FI_DEV_GPU_UTIL", " / 100"))],
                no_value=NO_DCGM,
            ),
            panel(
                "Tensor core activity per job (DCGM)",
                "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE (share of cycles the tensor pipes are busy) of the job's GPUs: "
                "high utilization with low tensor activity means the GPU waits on memory or small kernels.",
                "percentunit",
                [target(_dcgm_job("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"))],
                no_value=NO_DCGM,
            ),
            panel(
                "GPU utilization of the jobs' nodes (DCGM)",
                "Mean DCGM_FI_DEV_GPU_UTIL of every GPU on each node the job's pods run on (the exporter's "
                "Hostname, or a node label, read as worker_node): includes other workloads on a shared node.",
                "percentunit",
                [target(_node_join(_by_node("DCGM_FI_DEV_GPU_UTIL", " / 100")), f"{JOB_LEGEND} {{{{worker_node}}}}")],
                width=24,
                no_value=NO_DCGM,
            ),
        ],
    )


def cost() -> dict[str, Any]:
    from .dashboard_goodput import cost_panels

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
                [target(_node_join(_by_node("node_gpu_hourly_cost")), f"{JOB_LEGEND} {{{{worker_node}}}}")],
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
                        f"{_node_join(_by_node('node_gpu_hourly_cost'))}\n)",
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
