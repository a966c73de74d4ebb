"""The parts kubetune's dashboards are built from (panels, targets, rows, variables, the job matchers
and the joins to optional exporters), shared by dashboards.py and dashboard_goodput.py."""

from __future__ import annotations

from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Label matchers of a job's series, and of a job's worker series.
JOB = 'job_namespace=~"$job_namespace", finetunejob=~"$finetunejob"'
BY_JOB = "job_namespace, finetunejob"
JOB_LEGEND = "{{job_namespace}}/{{finetunejob}}"


def dcgm_by_pod(metric: str) -> str:
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


def job_pods() -> str:
    return f'max by ({BY_JOB}, worker_pod) (kubetune_job_pod_info{{{JOB}, worker_pod!=""}})'


def job_nodes() -> str:
    return f'max by ({BY_JOB}, worker_node) (kubetune_job_pod_info{{{JOB}, worker_node!=""}})'


def dcgm_job(metric: str, scale: str = "") -> str:
    """Mean of a DCGM gauge over the GPUs assigned to each job's worker pods."""
    return (
        f"avg by ({BY_JOB}) (\n  {dcgm_by_pod(metric)}{scale}\n"
        f"  * on(job_namespace, worker_pod) group_left(finetunejob)\n  {job_pods()}\n)"
    )


def node_join(node_series: str) -> str:
    """A per-node value (by `worker_node`) for each node a job's pods run on."""
    return f"{job_nodes()}\n* on(worker_node) group_left()\n{node_series}"


def by_node(metric: str, scale: str = "") -> str:
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


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def variables() -> list[dict[str, Any]]:
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
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["kubetune"], "title": "kubetune", "asDropdown": True, "includeVars": True}
        ],
        "panels": layout(panels),
    }


NO_TRAINER = "No data (no trainer metrics: the PodMonitor, metrics.podMonitor.enabled)"
NO_GPU = "No data (no GPU: NVML series come from trainers on GPU nodes)"
NO_DCGM = "No data (no DCGM exporter series)"
NO_OPENCOST = "No data (no OpenCost series)"
