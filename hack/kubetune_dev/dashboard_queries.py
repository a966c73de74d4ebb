"""Every panel query of the shipped Grafana dashboards, run on a Prometheus as Grafana would run it
over a time range: the dashboard variables set, an instant target queried at the range's end (with
`$__range` the range), a time series as a range query over it. For the tests and the demo."""

from __future__ import annotations

import time
from typing import Any

from kubetune_dev.prometheus import PrometheusServer
from kubetune_operator import dashboards

# Series of sources that may be absent: NVML (trainers on CPU export no GPU series), the DCGM
# exporter, OpenCost. Their panels show "No data" then, never an error.
GPU_OR_EXTERNAL = ("kubetune_trainer_gpu_", "kubetune_trainer_mfu", "DCGM_", "node_gpu_hourly_cost")
# Series of the trainer pods (absent where no trainer runs, e.g. on kwok).
TRAINER = ("kubetune_trainer_", "kubetune_checkpoint_")

Key = tuple[str, str, str]  # (dashboard, panel title, refId)


def exprs() -> dict[Key, str]:
    """(dashboard, panel title, refId) -> the target's PromQL, variables unexpanded."""
    return {
        (name, p["title"], t["refId"]): t["expr"]
        for name, build in dashboards.DASHBOARDS.items()
        for p in dashboards.panels(build())
        for t in p["targets"]
    }


def instant_keys() -> set[Key]:
    return {
        (name, p["title"], t["refId"])
        for name, build in dashboards.DASHBOARDS.items()
        for p in dashboards.panels(build())
        for t in p["targets"]
        if t.get("instant")
    }


def using(markers: tuple[str, ...]) -> set[Key]:
    """The targets whose query reads a series whose name contains one of `markers`."""
    return {key for key, e in exprs().items() if any(m in e for m in markers)}


def panel_results(
    prom: PrometheusServer,
    values: dict[str, str],
    start: float,
    end: float | None = None,
    *,
    step: float = 1.0,
    rate_interval: str = "10s",
) -> dict[Key, list[dict[str, Any]]]:
    """(dashboard, panel title, refId) -> what Grafana would get over [start, end]: an instant
    target's vector at `end`, a time series' matrix. PrometheusError on any failing query.
    rate_interval: Grafana's $__rate_interval, at least 4 scrape intervals."""
    end = time.time() if end is None else end
    range_ = f"{max(1, round(end - start))}s"
    instant = instant_keys()
    out: dict[Key, list[dict[str, Any]]] = {}
    for key, expr in exprs().items():
        q = dashboards.expand(expr, values, rate_interval=rate_interval, range_=range_)
        out[key] = prom.query(q, at=end) if key in instant else prom.query_range(q, start, end, step=step)
    return out


def last(result: list[dict[str, Any]]) -> float:
    """The value a panel shows now: an instant vector's one value, a time series' last point."""
    (series,) = result
    return float(series["values"][-1][1] if "values" in series else series["value"][1])
