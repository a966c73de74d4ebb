"""The Helm chart's values as a typed API: the one place each value is documented.

`valuesgen` writes charts/kubetune/values.yaml (each description as a comment above its key) and
charts/kubetune/values.schema.json (strict, descriptions included) from `ChartValues`; a unit test
fails when either drifts. Values the operator reads reach it as `Settings` fields through the
Deployment's KUBETUNE_* environment: those fields take their default, description and limits from
`Settings` itself (`_setting`), so the chart cannot document or default them differently.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo

from .policy import PodPolicy
from .settings import Settings

PullPolicy = Literal["Always", "IfNotPresent", "Never"]

_UNSET: Any = object()


def _setting(
    name: str, *, default: Any = _UNSET, description: str | None = None, note: str = "", **constraints: Any
) -> Any:
    """A chart field that is the Settings field `name`: its description (plus a chart-side `note`),
    default and limits, with `constraints` added where the chart needs more (a containerPort >= 1)."""
    source = Settings.model_fields[name]
    field: FieldInfo = copy.deepcopy(source)
    field.description = " ".join(filter(None, [description or source.description, note])) or None
    if default is not _UNSET:
        field.default, field.default_factory = default, None
    extra = Field(**constraints)  # keyword limits only (min_length, ge, ...): their metadata
    field.metadata = [*field.metadata, *extra.metadata]
    return field


class _Values(BaseModel):
    # camelCase keys like the rest of the chart; unknown keys are errors here and in the schema.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Crds(_Values):
    enabled: bool = Field(True, description="Install the FineTuneJob CRD with the chart.")
    keep: bool = Field(True, description="Keep the CRD (and so every FineTuneJob) when the chart is uninstalled.")


class OperatorImage(_Values):
    repository: str = Field("localhost/kubetune-operator", min_length=1, description="Image repository.")
    tag: str = Field("", description="Image tag; empty: the chart's appVersion.")
    pull_policy: PullPolicy = Field("IfNotPresent", description="Kubernetes imagePullPolicy of the container.")


class Operator(_Values):
    image: OperatorImage = Field(default_factory=OperatorImage, description="The operator's container image.")
    watch_namespace: str = _setting("watch_namespace")
    log_format: Literal["json", "plain"] = Field(
        "json", description="Log line format of the operator: json (one object a line) or plain text."
    )
    resources: dict[str, Any] = Field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        description="Resource requests and limits of the operator container.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of the operator pod.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations of the operator pod.")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Affinity of the operator pod.")
    priority_class_name: str = Field("", description="PriorityClass of the operator pod (empty: none).")
    extra_env: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra environment variables (EnvVar objects) for the operator container."
    )


class Trainer(_Values):
    image: str = _setting(
        "trainer_image",
        default="localhost/kubetune-trainer",
        min_length=1,
        note="For FineTuneJobs that do not set spec.pod.image; without a tag or digest the chart appends its "
        "appVersion.",
    )
    pull_policy: PullPolicy = _setting("trainer_image_pull_policy")


class Placement(_Values):
    capacity_type_label: str = _setting(
        "capacity_type_label",
        min_length=1,
        note="Karpenter: karpenter.sh/capacity-type=spot; EKS managed node groups: eks.amazonaws.com/capacityType=SPOT;"
        " GKE: cloud.google.com/gke-spot=true.",
    )
    spot_value: str = _setting("spot_value", min_length=1)
    spot_tolerations: list[dict[str, Any]] = _setting("spot_tolerations")
    gpu_resource: str = _setting("gpu_resource", min_length=1)
    gpu_type_label: str = _setting("gpu_type_label", min_length=1, note="NVIDIA GPU feature discovery sets this one.")


class GpuPrice(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    on_demand: float = Field(alias="on-demand", ge=0, description="USD per GPU-hour on on-demand nodes.")
    spot: float | None = Field(None, ge=0, description="USD per GPU-hour on spot nodes.")


class Cost(_Values):
    # Not a mirror of Settings.gpu_prices: its default is the whole built-in table, the chart's is "keep it".
    gpu_prices: dict[str, GpuPrice] = Field(
        default_factory=dict,
        description='USD per GPU-hour by GPU product label, {TYPE: {on-demand: X, spot: Y}}; "default" covers the '
        "other types. Empty keeps the built-in list prices (DEFAULT_GPU_PRICES in operator/kubetune_operator/"
        'settings.py). When set, it must have a "default" row (with on-demand).',
        json_schema_extra={"if": {"minProperties": 1}, "then": {"required": ["default"]}},
    )
    cpu_hour_price: float = _setting("cpu_hour_price")

    @field_validator("gpu_prices")
    @classmethod
    def _default_row(cls, prices: dict[str, GpuPrice]) -> dict[str, GpuPrice]:
        if prices and "default" not in prices:
            raise ValueError('cost.gpuPrices needs a "default" row (the price of the other GPU types)')
        return prices


# A Prometheus duration, as prometheus-operator's CRDs accept it ("30s", "1h30m", "0").
DURATION = r"^((([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?|0)$"


def _duration(default: str, description: str, *, optional: bool = False, alias: str | None = None) -> Any:
    return Field(default, pattern=DURATION, min_length=0 if optional else 1, description=description, alias=alias)


def _additional_labels(what: str) -> Any:
    return Field(
        default_factory=dict,
        description=f"Labels added to the {what}, e.g. {{release: <the kube-prometheus-stack release>}}: that "
        "stack's Prometheus selects only monitors and rules with its release label.",
    )


class ServiceMonitor(_Values):
    enabled: bool = Field(False, description="Create it (needs the prometheus-operator CRDs in the cluster).")
    additional_labels: dict[str, str] = _additional_labels("ServiceMonitor")
    interval: str = _duration("30s", "Scrape interval.")
    scrape_timeout: str = _duration(
        "", "Scrape timeout, at most the interval; empty: Prometheus' default.", optional=True
    )
    honor_labels: bool = Field(
        False,
        description="Keep the operator's own label on a clash with a target label. Not needed: kubetune's label "
        "names (finetunejob, job_namespace, worker_pod) avoid job, namespace, pod and instance.",
    )


class PodMonitor(_Values):
    enabled: bool = Field(False, description="Create it (needs the prometheus-operator CRDs in the cluster).")
    additional_labels: dict[str, str] = _additional_labels("PodMonitor")
    interval: str = _duration("30s", "Scrape interval.")
    scrape_timeout: str = _duration(
        "", "Scrape timeout, at most the interval; empty: Prometheus' default.", optional=True
    )


class JobStalledAlert(_Values):
    enabled: bool = Field(True, description="Create this alert.")
    window: str = _duration("15m", "No optimizer step in this long (while training is unfinished) is a stall.")
    for_: str = _duration("5m", "How long the stall must last before the alert fires.", alias="for")
    severity: str = Field("warning", min_length=1, description="The alert's severity label.")


class GpuIdleAlert(_Values):
    enabled: bool = Field(
        True, description="Create this alert (it never fires for CPU jobs: they export no GPU series)."
    )
    threshold: float = Field(0.1, ge=0, le=1, description="Mean GPU utilization (0-1) of a job below which it is idle.")
    window: str = _duration("10m", "The mean is over this long.")
    for_: str = _duration("15m", "How long the GPUs must stay idle before the alert fires.", alias="for")
    severity: str = Field("warning", min_length=1, description="The alert's severity label.")


class CountAlert(_Values):
    enabled: bool = Field(True, description="Create this alert.")
    threshold: int = Field(3, ge=1, description="This many or more in the window fire the alert.")
    window: str = _duration("1h", "The window the increase is counted over.")
    for_: str = _duration("0m", "How long the condition must hold before the alert fires.", alias="for")
    severity: str = Field("warning", min_length=1, description="The alert's severity label.")


class BudgetAlert(_Values):
    enabled: bool = Field(True, description="Create this alert.")
    threshold: float = Field(
        0.8, gt=0, le=1, description="Fraction of the job's budget (USD or GPU-time) used at which it fires."
    )
    for_: str = _duration("0m", "How long the condition must hold before the alert fires.", alias="for")
    severity: str = Field("warning", min_length=1, description="The alert's severity label.")


class OperatorDownAlert(_Values):
    enabled: bool = Field(True, description="Create this alert.")
    for_: str = _duration("5m", "How long no operator target may be up before the alert fires.", alias="for")
    severity: str = Field("critical", min_length=1, description="The alert's severity label.")


class Alerts(_Values):
    job_stalled: JobStalledAlert = Field(
        default_factory=JobStalledAlert,
        description="KubetuneJobStalled: a trainer whose optimizer step has not moved (hung NCCL collective, "
        "deadlocked data loader, stuck checkpoint upload).",
    )
    gpu_idle: GpuIdleAlert = Field(
        default_factory=GpuIdleAlert, description="KubetuneGpuIdle: GPUs paid for but barely used by a running trainer."
    )
    preemption_storm: CountAlert = Field(
        default_factory=CountAlert,
        description="KubetuneJobPreemptionStorm: a job preempted (spot reclaimed, evicted) `threshold` times in "
        "`window`.",
    )
    repeated_restarts: CountAlert = Field(
        default_factory=CountAlert,
        description="KubetuneJobRestarting: a job restarted after failures `threshold` times in `window`.",
    )
    budget_nearly_exceeded: BudgetAlert = Field(
        default_factory=BudgetAlert,
        description="KubetuneJobBudgetNearlyExceeded: a job has used `threshold` of its spec.budget (maxUsd or "
        "maxGpuHours).",
    )
    budget_exceeded: BudgetAlert = Field(
        default_factory=lambda: BudgetAlert(threshold=1.0),
        description="KubetuneJobBudgetExceeded: a job has used all of its spec.budget; the operator has suspended "
        "it (condition BudgetExceeded) until the budget is raised.",
    )
    operator_down: OperatorDownAlert = Field(
        default_factory=OperatorDownAlert,
        description="KubetuneOperatorDown: no operator target up, so nobody reconciles FineTuneJobs.",
    )
    reconcile_errors: CountAlert = Field(
        default_factory=lambda: CountAlert(threshold=5, window="15m", for_="5m"),
        description="KubetuneReconcileErrors: `threshold` or more failed reconciles of one kind (api, sweep; write "
        "conflicts are retried at once and not counted) in `window`.",
    )


class PrometheusRule(_Values):
    enabled: bool = Field(False, description="Create it (needs the prometheus-operator CRDs in the cluster).")
    additional_labels: dict[str, str] = _additional_labels("PrometheusRule")
    alert_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels added to every alert (Alertmanager routing: team, cluster)."
    )
    runbook_url: str = Field(
        "",
        description="Base URL of your runbooks; when set, each alert gets runbook_url: <base>#<alertname in lower "
        "case>. Each alert always has a one-line `runbook` annotation.",
    )
    operator_job: str = Field(
        "",
        description="The `job` label of the operator's scrape target; empty: the metrics Service's name, which the "
        "ServiceMonitor gives it.",
    )
    alerts: Alerts = Field(default_factory=Alerts, description="The alerts, each with its thresholds.")


class Metrics(_Values):
    port: int = _setting(
        "metrics_port", ge=1, le=65535, description="Port of the operator's /metrics endpoint and of its Service."
    )
    service_monitor: ServiceMonitor = Field(
        default_factory=ServiceMonitor, description="A prometheus-operator ServiceMonitor for the operator's /metrics."
    )
    pod_monitor: PodMonitor = Field(
        default_factory=PodMonitor,
        description="A prometheus-operator PodMonitor for the trainer pods' /metrics (port `metrics`), in every "
        "namespace (operator.watchNamespace's only, when set). Their series get the target labels finetunejob, "
        "job_namespace, worker_pod and worker_node.",
    )
    prometheus_rule: PrometheusRule = Field(
        default_factory=PrometheusRule,
        description="A prometheus-operator PrometheusRule with kubetune's alerts (charts/kubetune/README.md).",
    )


class Dashboards(_Values):
    enabled: bool = Field(
        False,
        description="Ship kubetune's Grafana dashboards (Utilization, Cost) as ConfigMaps for Grafana's dashboard "
        "sidecar (kube-prometheus-stack: grafana.sidecar.dashboards.enabled). The JSON files in the chart's "
        "dashboards/ folder also import as they are.",
    )
    namespace: str = Field(
        "",
        description="Namespace of the ConfigMaps; empty: the release's. The sidecar watches its own namespace "
        "unless grafana.sidecar.dashboards.searchNamespace is ALL (or names this one).",
    )
    labels: dict[str, str] = Field(
        default_factory=lambda: {"grafana_dashboard": "1"},
        description="Labels of the ConfigMaps: the sidecar loads those with its label (grafana.sidecar.dashboards."
        'label and labelValue; kube-prometheus-stack\'s defaults: grafana_dashboard: "1").',
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations of the ConfigMaps, e.g. {grafana_folder: kubetune} with grafana.sidecar.dashboards."
        "folderAnnotation=grafana_folder to file them in a folder.",
    )


class NetworkPolicy(_Values):
    enabled: bool = Field(
        False,
        description="Ship a NetworkPolicy per namespace in `namespaces`: only the operator (and the monitoring "
        "namespace, for /metrics) reaches the trainers' port 9400; trainers of a job reach each other's rendezvous "
        "port; other ingress to trainer pods is dropped (needs a CNI that enforces NetworkPolicy).",
    )
    namespaces: list[str] = Field(
        default_factory=list,
        description="The namespaces FineTuneJobs run in (a NetworkPolicy is namespaced); empty: "
        "operator.watchNamespace when set.",
    )
    monitoring_namespace: str = Field(
        "monitoring", description="Namespace of the Prometheus that scrapes trainers' /metrics (empty: none)."
    )


class ChartValues(_Values):
    global_: dict[str, Any] = Field(
        default_factory=dict,
        alias="global",
        description="Values a parent chart shares with its subcharts; kubetune reads none of them (accepted so the "
        "chart works as a subchart).",
    )
    crds: Crds = Field(default_factory=Crds, description="The FineTuneJob CRD's lifecycle.")
    operator: Operator = Field(default_factory=Operator, description="The operator Deployment.")
    trainer: Trainer = Field(default_factory=Trainer, description="Defaults for the trainer pods the operator creates.")
    placement: Placement = Field(default_factory=Placement, description="How trainer pods find spot and GPU nodes.")
    cost: Cost = Field(default_factory=Cost, description="Prices for the cost estimate in each job's status.")
    progress_poll_seconds: float = _setting(
        "progress_poll_seconds", note="In seconds; also the period of the deadline/TTL sweep."
    )
    preflight_s3_endpoint: bool = _setting("preflight_s3_endpoint")
    pod_policy: PodPolicy = _setting("pod_policy", note="docs/design/security.md.")
    network_policy: NetworkPolicy = Field(
        default_factory=NetworkPolicy, description="Who may reach trainer pods (docs/design/security.md)."
    )
    metrics: Metrics = Field(default_factory=Metrics, description="The operator's Prometheus metrics.")
    dashboards: Dashboards = Field(
        default_factory=Dashboards, description="Grafana dashboards of the jobs' utilization and cost."
    )


# Where the operator finds each chart value: Settings field -> values path. The Deployment passes
# each as KUBETUNE_<FIELD> (health_port is fixed by the chart: its liveness probe names the port).
SETTINGS_PATHS: dict[str, str] = {
    "watch_namespace": "operator.watchNamespace",
    "trainer_image": "trainer.image",
    "trainer_image_pull_policy": "trainer.pullPolicy",
    "capacity_type_label": "placement.capacityTypeLabel",
    "spot_value": "placement.spotValue",
    "spot_tolerations": "placement.spotTolerations",
    "gpu_resource": "placement.gpuResource",
    "gpu_type_label": "placement.gpuTypeLabel",
    "gpu_prices": "cost.gpuPrices",
    "cpu_hour_price": "cost.cpuHourPrice",
    "progress_poll_seconds": "progressPollSeconds",
    "preflight_s3_endpoint": "preflightS3Endpoint",
    "pod_policy": "podPolicy",
    "metrics_port": "metrics.port",
}
