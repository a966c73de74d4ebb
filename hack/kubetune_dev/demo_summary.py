"""The demo's closing utilization/cost summary: each figure read from the stack's Prometheus (the
operator's per-job series, as the Cost dashboard reads them) beside the value in the job's status.
A series Prometheus does not have is "n/a" (e.g. the goodput series of an operator without them).

    GPU-hours              Prometheus 0.0000      status 0.0000
"""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from kubetune_dev.prometheus import PrometheusError, PrometheusServer


def _num(v: Any) -> float | None:
    try:
        return None if v is None else float(Decimal(str(v)))
    except (InvalidOperation, ValueError):
        return None


def rows(ns: str, name: str) -> list[tuple[str, str, str, Callable[[dict[str, Any]], float | None]]]:
    """(label, unit, PromQL, the status value) for each line of the summary."""
    sel = f'job_namespace="{ns}",finetunejob="{name}"'
    usd = f"max(kubetune_job_cost_usd_total{{{sel}}})"
    worker = f"max(kubetune_job_worker_seconds_total{{{sel}}})"
    lost = f'max(kubetune_job_goodput_seconds_total{{{sel},category="lost_to_preemption"}})'

    def cost(st: dict[str, Any]) -> dict[str, Any]:
        return st.get("cost") or {}

    def goodput(st: dict[str, Any]) -> dict[str, Any]:
        return cost(st).get("goodput") or {}

    def gpu_hours(st: dict[str, Any]) -> float | None:
        spot, od = _num(cost(st).get("spotGpuHours")), _num(cost(st).get("onDemandGpuHours"))
        return None if spot is None and od is None else (spot or 0) + (od or 0)

    def savings(st: dict[str, Any]) -> float | None:
        od, est = _num(cost(st).get("onDemandUsd")), _num(cost(st).get("estimatedUsd"))
        return None if od is None or est is None else od - est

    def ratio_pct(st: dict[str, Any]) -> float | None:
        r = _num(goodput(st).get("ratio"))
        return None if r is None else 100 * r

    return [
        ("GPU-hours", "h", f"sum(kubetune_job_gpu_seconds_total{{{sel}}}) / 3600", gpu_hours),
        (
            "CPU core-hours",
            "h",
            f"max(kubetune_job_cpu_core_seconds_total{{{sel}}}) / 3600",
            lambda st: _num(cost(st).get("cpuCoreHours")),
        ),  # fmt: skip
        ("cost", "USD", usd, lambda st: _num(cost(st).get("estimatedUsd"))),
        ("spot savings", "USD", f"max(kubetune_job_on_demand_cost_usd_total{{{sel}}}) - {usd}", savings),
        ("goodput", "%", f"100 * max(kubetune_job_goodput_ratio{{{sel}}})", ratio_pct),
        (
            "lost to preemption",
            "USD",
            f"{lost} * {usd} / {worker}",
            lambda st: _num(goodput(st).get("lostToPreemptionUsd")),
        ),  # fmt: skip
        ("preemptions", "", f"max(kubetune_job_preemptions_total{{{sel}}})", lambda st: _num(st.get("preemptions"))),
    ]


def _fmt(v: float | None, unit: str) -> str:
    if v is None or v != v:  # absent, or NaN (0/0)
        return "n/a"
    if unit == "USD":
        return f"${v:.6f}"
    if unit == "":
        return f"{v:.0f}"
    return f"{v:.2f}%" if unit == "%" else f"{v:.4f} {unit}"


def values(prom: PrometheusServer, ns: str, name: str) -> dict[str, float | None]:
    """label -> the figure Prometheus has now (None: no series)."""
    out: dict[str, float | None] = {}
    for label, _, expr, _ in rows(ns, name):
        try:
            out[label] = prom.value(expr)
        except PrometheusError:
            out[label] = None
    return out


def wait_scraped(prom: PrometheusServer, ns: str, name: str, status: dict[str, Any], timeout: float = 30) -> None:
    """Until Prometheus has scraped the job's final cost (the operator's last status write)."""
    want = _num((status.get("cost") or {}).get("estimatedUsd"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = values(prom, ns, name)["cost"]
        if want is None or (got is not None and abs(got - want) < 1e-9):
            return
        time.sleep(0.5)


def summary(prom: PrometheusServer, ns: str, name: str, status: dict[str, Any]) -> str:
    """The summary table: label, Prometheus' figure, the status' figure."""
    got = values(prom, ns, name)
    lines = [f"     {'':<20} {'Prometheus':>16} {'status':>16}"]
    for label, unit, _, from_status in rows(ns, name):
        lines.append(f"     {label:<20} {_fmt(got[label], unit):>16} {_fmt(from_status(status), unit):>16}")
    return "\n".join(lines)
