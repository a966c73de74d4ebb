"""GPU-hours (by capacity type), worker-seconds, CPU core-hours, estimated USD and its on-demand
equivalent, accrued in the job's status for the time trainer containers run; and the time worker
pods waited for their container to start (goodput.pendingSeconds). Pure."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from typing import Any

from .api import ResourcesSpec
from .settings import Settings
from .timeutil import parse_time, rfc3339
from .views import GpuPrice, NodeView, PodView

_CPU = re.compile(r"^([0-9.]+)(m?)$")


def cpu_cores(quantity: str) -> float:
    m = _CPU.match(quantity.strip())
    if not m:
        return 1.0  # exotic quantity forms: count one core rather than fail a status update
    value = float(m.group(1))
    return value / 1000 if m.group(2) else value


def price_per_hour(settings: Settings, node: NodeView | None, resources: ResourcesSpec) -> float:
    """USD per hour for one worker on `node` (spot or on-demand price of its GPU type)."""
    capacity = node.capacity_type if node else "on-demand"
    if resources.gpus:
        gpu_type = (node.gpu_type if node else None) or resources.gpu_type or "default"
        table = settings.gpu_prices.get(gpu_type) or settings.gpu_prices["default"]
        return resources.gpus * table.get(capacity, table["on-demand"])
    return cpu_cores(resources.cpu) * settings.cpu_hour_price


def gpu_hour_prices(settings: Settings, gpu_type: str | None, policy: str) -> tuple[float, float]:
    """(low, high) USD per GPU-hour a job of this GPU type may pay under its capacity policy: spot
    for spot, on-demand for on-demand, spot..on-demand for spot-preferred (the estimate's range)."""
    table = settings.gpu_prices.get(gpu_type or "default") or settings.gpu_prices["default"]
    spot, on_demand = table.get("spot", table["on-demand"]), table["on-demand"]
    if policy == "spot":
        return spot, spot
    if policy == "on-demand":
        return on_demand, on_demand
    return spot, on_demand


def accrue(
    cost: dict[str, Any] | None,
    pods: Iterable[PodView],
    nodes: dict[str, NodeView],
    resources: ResourcesSpec,
    price: GpuPrice,
    now: dt.datetime,
) -> dict[str, Any]:
    """Add, for every worker container, the part of its run between `accruedUntil` and `now`:
    GPU-hours by capacity type, worker-seconds and CPU core-hours, USD at the node's price, and USD
    at the on-demand price of the same GPU type (what the job would have cost without spot); and
    for every pod the part of its creation -> container start between the two. Idempotent for a given `now`;
    every total only grows (the operator's metrics export them as counters)."""
    now = now.replace(microsecond=0)  # accruedUntil has second resolution; stay consistent with it
    cost = dict(cost or {})
    since = parse_time(cost.get("accruedUntil")) or now
    usd = float(cost.get("estimatedUsd", "0") or 0)
    gpu_hours = float(cost.get("gpuHours", 0.0))
    spot_gpu_hours = float(cost.get("spotGpuHours", 0.0))
    # A status from before these fields existed: everything that was not spot was on-demand.
    on_demand_gpu_hours = float(cost.get("onDemandGpuHours", max(0.0, round(gpu_hours - spot_gpu_hours, 6))))
    on_demand_usd = float(cost.get("onDemandUsd", usd) or 0)
    cores = cpu_cores(resources.cpu)
    # ... and before workerSeconds existed: GPU-hours per GPU were the worker time (CPU jobs: unknown, 0).
    worker_seconds = float(cost.get("workerSeconds", gpu_hours * 3600 / resources.gpus if resources.gpus else 0.0))
    cpu_core_hours = float(cost.get("cpuCoreHours", worker_seconds / 3600 * cores))
    goodput = dict(cost.get("goodput") or {})
    pending = float(goodput.get("pendingSeconds", 0.0))
    for pod in pods:
        if pod.created_at is not None:  # creation -> container start: waiting, not paid
            waited_until = min(now, pod.started_at or pod.finished_at or now)
            pending += max(0.0, (waited_until - max(since, pod.created_at)).total_seconds())
        if pod.started_at is None or not pod.node:
            continue
        start = max(since, pod.started_at)
        end = min(now, pod.finished_at or now)
        hours = max(0.0, (end - start).total_seconds() / 3600)
        worker_seconds += hours * 3600
        cpu_core_hours += hours * cores
        node = nodes.get(pod.node)
        usd += hours * price(node, resources)
        on_demand_node = NodeView(node.name, "on-demand", node.gpu_type) if node is not None else None
        on_demand_usd += hours * price(on_demand_node, resources)
        gpu_hours += hours * resources.gpus
        if node is not None and node.capacity_type == "spot":
            spot_gpu_hours += hours * resources.gpus
        else:
            on_demand_gpu_hours += hours * resources.gpus
    goodput["pendingSeconds"] = round(pending, 3)
    return {
        **cost,  # (goodput's other fields, the ledger, tokens: goodput.py keeps them)
        "goodput": goodput,
        "workerSeconds": round(worker_seconds, 3),
        "cpuCoreHours": round(cpu_core_hours, 6),
        "gpuHours": round(gpu_hours, 6),
        "spotGpuHours": round(spot_gpu_hours, 6),
        "onDemandGpuHours": round(on_demand_gpu_hours, 6),
        "estimatedUsd": f"{usd:.4f}",
        "onDemandUsd": f"{on_demand_usd:.4f}",
        "accruedUntil": rfc3339(now),
    }
