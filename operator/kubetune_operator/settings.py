"""Operator settings: read once at startup from KUBETUNE_* environment variables (the Helm chart
sets them from values.yaml). Each field says what it controls."""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .policy import PodPolicy

# USD per GPU-hour by GPU product label (spot, on-demand). Rough public list prices; override
# with KUBETUNE_GPU_PRICES (JSON) to match your cloud contract. "default" covers unknown types.
DEFAULT_GPU_PRICES: dict[str, dict[str, float]] = {
    "default": {"on-demand": 2.00, "spot": 0.80},
    "NVIDIA-H100-80GB-HBM3": {"on-demand": 6.98, "spot": 2.50},
    "NVIDIA-A100-SXM4-80GB": {"on-demand": 4.10, "spot": 1.60},
    "NVIDIA-A100-SXM4-40GB": {"on-demand": 3.67, "spot": 1.20},
    "NVIDIA-L4": {"on-demand": 0.81, "spot": 0.32},
    "Tesla-T4": {"on-demand": 0.53, "spot": 0.16},
    "NVIDIA-A10G": {"on-demand": 1.21, "spot": 0.45},
}


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    trainer_image: str = Field(
        default_factory=lambda: f"localhost/kubetune-trainer:{version('kubetune')}",
        description="Default trainer image (tag: the package's version, which is the chart's appVersion).",
    )
    trainer_image_pull_policy: str = Field("IfNotPresent", description="Default pull policy of trainer pods.")
    watch_namespace: str = Field("", description="Only watch this namespace (empty: all namespaces).")
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    gpu_type_label: str = Field("nvidia.com/gpu.product", description="Node label holding the GPU product name.")
    capacity_type_label: str = Field(
        "karpenter.sh/capacity-type",
        description="Node label that tells spot from on-demand nodes (EKS: eks.amazonaws.com/capacityType).",
    )
    spot_value: str = Field(
        "spot", description="Value of capacity_type_label on spot nodes (EKS: SPOT); any other value is on-demand."
    )
    spot_tolerations: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"key": "kubetune.io/spot", "operator": "Exists", "effect": "NoSchedule"}],
        description="Tolerations added to pods that may run on spot nodes (match your spot taints).",
    )
    gpu_prices: dict[str, dict[str, float]] = Field(default_factory=lambda: dict(DEFAULT_GPU_PRICES))
    cpu_hour_price: float = Field(0.04, ge=0, description="USD per vCPU-hour, for CPU-only jobs.")
    progress_poll_seconds: float = Field(10.0, gt=0, description="How often running trainers are asked for progress.")
    preflight_s3_endpoint: bool = Field(
        True,
        description="TCP-check spec.s3.endpoint before creating pods (turn off when the operator cannot "
        "reach the network the trainers use).",
    )
    pod_policy: PodPolicy = Field(
        default_factory=PodPolicy,
        description="What FineTuneJobs may set in spec.pod (images, ServiceAccounts, PriorityClasses, Secret env, "
        "tolerations, node selectors); a job that sets more waits with Ready=False, reason PolicyViolation.",
    )
    metrics_port: int = Field(8080, description="Operator /metrics port (0 disables).")
    health_port: int = Field(8081, description="Liveness probe port (/healthz).")

    @field_validator("gpu_prices")
    @classmethod
    def _default_price(cls, prices: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        if "default" not in prices or "on-demand" not in prices["default"]:
            raise ValueError('the GPU price table (chart value cost.gpuPrices) needs a "default" row with on-demand')
        return prices

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(f"KUBETUNE_{name.upper()}")
            if raw is None or raw == "":
                continue
            annotation = str(field.annotation)
            structured = "list" in annotation or "dict" in annotation or "Policy" in annotation
            values[name] = json.loads(raw) if structured else raw
        return cls(**values)
