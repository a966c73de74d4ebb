"""The FineTuneJob API (kubetune.io/v1alpha1): the one source of truth for its schema.

`crdgen` turns these models into the CRD's openAPIV3Schema (manifests/ and the chart carry the
generated copy; a test fails on drift). The training-facing parts are the trainer-config
contract's own models, so spec and trainer config cannot disagree. Cross-field rules that the
API server must enforce are CEL (`x-kubernetes-validations`) on the models that own the fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from kubetune_contract.config import (
    CheckpointSpec,
    DatasetSpec,
    LoraSpec,
    Method,
    ModelSpec,
    OutputSpec,
    S3Spec,
    SpecModel,
    TrainingSpec,
)
from kubetune_contract.progress import CheckpointRef
from kubetune_contract.sizing import DatasetFacts

GROUP = "kubetune.io"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["kubetune"]
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes objects passed through verbatim (validated by the API server when the pod is created).
K8sObject = dict[str, Any]

_QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


class ResourcesSpec(SpecModel):
    """What each worker pod gets."""

    model_config = SpecModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.gpuType) || self.gpus > 0",
                    "message": "resources.gpuType needs resources.gpus > 0",
                    "fieldPath": ".gpuType",
                }
            ]
        }
    }

    gpus: int = Field(0, ge=0, le=16, description="GPUs per worker (nvidia.com/gpu).")
    gpu_type: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$",
        description="Value of the node's GPU product label (operator setting gpuTypeLabel, "
        "default nvidia.com/gpu.product), e.g. NVIDIA-A100-SXM4-80GB.",
    )
    cpu: str = Field("2", pattern=_QUANTITY, description="CPU request and limit per worker (quantity).")
    memory: str = Field("8Gi", pattern=_QUANTITY, description="Memory request and limit per worker (quantity).")
    ephemeral_storage: str | None = Field(
        None, pattern=_QUANTITY, description="Local scratch for model and checkpoint staging (quantity)."
    )
    workers: int = Field(1, ge=1, le=64, description="Trainer pods; ranks talk over torch.distributed.")


class CapacitySpec(SpecModel):
    """Which kind of nodes to run on, and how many preemptions to absorb."""

    model_config = SpecModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "self.policy != 'on-demand' || !self.fallbackToOnDemand",
                    "message": "capacity.fallbackToOnDemand only applies to spot policies",
                    "fieldPath": ".fallbackToOnDemand",
                }
            ]
        }
    }

    policy: Literal["spot", "on-demand", "spot-preferred"] = Field(
        "spot-preferred",
        description="spot: only spot nodes; on-demand: never spot; spot-preferred: spot when there is room.",
    )
    max_preemptions: int = Field(
        10, ge=0, le=1000, description="Preemptions absorbed before the job fails (or falls back)."
    )
    fallback_to_on_demand: bool = Field(
        False, description="After maxPreemptions, continue on on-demand nodes instead of failing."
    )


class RunPolicy(SpecModel):
    """Lifecycle limits (batch/v1 Job semantics)."""

    backoff_limit: int = Field(
        3, ge=0, le=100, description="Retries after infrastructure failures (preemptions do not count)."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job when it has been active this long (since start)."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the finished job (not its S3 data) after this many seconds."
    )
    suspend: bool = Field(False, description="Deletes running pods (checkpointing first); resumes when false.")


class BudgetSpec(SpecModel):
    """A spending limit on the job's accrued estimate (status.cost). When the estimate reaches a
    limit, the operator deletes the worker pods (each makes its checkpoint durable on SIGTERM) and
    the job is Suspended with condition BudgetExceeded; raising or removing the limit resumes it
    from the last checkpoint. A Warning event BudgetNearlyExceeded comes once at 80%."""

    max_usd: float | None = Field(
        None,
        gt=0,
        description="Stop at this estimated USD (status.cost.estimatedUsd, at the operator's price table).",
    )
    max_gpu_hours: float | None = Field(
        None, gt=0, description="Stop at this many GPU-hours (status.cost.gpuHours, all workers, all capacity types)."
    )


class PodOverrides(SpecModel):
    """Pass-through to the trainer pods."""

    image: str | None = Field(
        None, min_length=1, max_length=512, description="Trainer image (default: operator setting)."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    env: list[K8sObject] | None = Field(None, description="Extra env vars (core/v1 EnvVar).")
    node_selector: dict[str, str] | None = None
    tolerations: list[K8sObject] | None = None
    affinity: K8sObject | None = None
    priority_class_name: str | None = Field(None, max_length=253)
    service_account_name: str | None = Field(None, max_length=253)
    termination_grace_period_seconds: int = Field(
        60, ge=5, le=3600, description="Time for the final checkpoint after SIGTERM (spot notices give ~30-120 s)."
    )
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None

    @field_validator("affinity")
    @classmethod
    def _affinity_shape(cls, v: K8sObject | None) -> K8sObject | None:
        """The shape render._affinity merges into (core/v1 Affinity), checked before any pod is built."""
        for key, value in (v or {}).items():
            if not isinstance(value, dict):
                raise ValueError(f"affinity.{key} must be an object (core/v1 Affinity), not {type(value).__name__}")
        node = (v or {}).get("nodeAffinity") or {}
        required = node.get("requiredDuringSchedulingIgnoredDuringExecution")
        if required is not None and not (
            isinstance(required, dict)
            and isinstance(required.get("nodeSelectorTerms", []), list)
            and all(isinstance(t, dict) for t in required.get("nodeSelectorTerms", []))
        ):
            raise ValueError(
                "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution must hold a "
                "list of nodeSelectorTerms objects"
            )
        preferred = node.get("preferredDuringSchedulingIgnoredDuringExecution")
        if preferred is not None and not (isinstance(preferred, list) and all(isinstance(t, dict) for t in preferred)):
            raise ValueError("affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution must be a list")
        return v


class PreflightSpec(SpecModel):
    """Checks before any GPU is requested."""

    estimate: bool = Field(
        True,
        description="For a GPU job (resources.gpus > 0): size it first in a short CPU-only pod (the trainer image, "
        "the job's credentials) that reads the base model's config.json (and, for training.epochs, the dataset); "
        "the operator writes status.estimate and holds the job (condition Ready=False, reason WontFit, with advice) "
        "when it cannot fit its GPUs. false: no sizing pod, no estimate, no refusal.",
    )


class FineTuneJobSpec(SpecModel):
    """A fine-tuning run: model, data, method, resources, spot policy, storage."""

    model_config = SpecModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "self.method != 'qlora' || (has(self.resources) && self.resources.gpus > 0)",
                    "message": "method qlora needs resources.gpus > 0 (bitsandbytes 4-bit runs on GPUs only)",
                    "fieldPath": ".method",
                },
                {
                    "rule": "!has(self.training.deepspeed) || self.training.deepspeed == 'none' || "
                    "(has(self.resources) && self.resources.gpus > 0)",
                    "message": "training.deepspeed needs resources.gpus > 0",
                    "fieldPath": ".training.deepspeed",
                },
                {
                    # The trainer loads the 4-bit base whole on each GPU (a per-GPU device_map, no
                    # zero.Init): ZeRO-3 cannot partition bitsandbytes' packed weights that way.
                    "rule": "self.method != 'qlora' || !has(self.training.deepspeed) || "
                    "!self.training.deepspeed.startsWith('zero3')",
                    "message": "method qlora cannot use training.deepspeed zero3/zero3-offload: ZeRO-3 partitions "
                    "parameters and this trainer loads the 4-bit base whole on each GPU; use zero2 (it shards the "
                    "adapters' gradients and optimizer state), or method lora with zero3",
                    "fieldPath": ".training.deepspeed",
                },
                {
                    "rule": "!has(self.training.precision) || self.training.precision != 'fp16' || "
                    "(has(self.resources) && self.resources.gpus > 0)",
                    "message": "training.precision fp16 needs resources.gpus > 0 (CPUs train in fp32 or bf16)",
                    "fieldPath": ".training.precision",
                },
                {
                    "rule": "!has(self.training.evalSteps) || has(self.dataset.validationUri) || "
                    "(has(self.dataset.validationSplit) && self.dataset.validationSplit > 0.0)",
                    "message": "training.evalSteps needs validation data: set dataset.validationSplit > 0 or "
                    "dataset.validationUri",
                    "fieldPath": ".training.evalSteps",
                },
                {
                    "rule": "!has(self.training.liger) || self.training.liger != 'always' || "
                    "(has(self.resources) && self.resources.gpus > 0)",
                    "message": "training.liger always needs resources.gpus > 0 (Liger's kernels are Triton, CUDA "
                    "only); use auto or never on CPU",
                    "fieldPath": ".training.liger",
                },
                {
                    "rule": "!has(self.training.gradientCheckpointingEveryNLayers) || "
                    "(has(self.training.gradientCheckpointing) && "
                    "self.training.gradientCheckpointing in ['always', 'offload'])",
                    "message": "training.gradientCheckpointingEveryNLayers needs training.gradientCheckpointing "
                    "always or offload (auto chooses by itself)",
                    "fieldPath": ".training.gradientCheckpointingEveryNLayers",
                },
                {
                    "rule": "has(self.training.maxSteps) || has(self.training.epochs)",
                    "message": "set training.maxSteps or training.epochs",
                    "fieldPath": ".training",
                },
            ]
        }
    }

    base_model: ModelSpec
    dataset: DatasetSpec
    method: Method = Field("lora", description="lora | qlora | full.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Used by lora and qlora.")
    training: TrainingSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    capacity: CapacitySpec = Field(default_factory=CapacitySpec)
    checkpoints: CheckpointSpec
    output: OutputSpec
    s3: S3Spec = Field(default_factory=S3Spec)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    budget: BudgetSpec | None = Field(
        None, description="Spending limits; at one, the job checkpoints and is suspended until it is raised."
    )
    pod: PodOverrides = Field(default_factory=PodOverrides)
    preflight: PreflightSpec = Field(default_factory=PreflightSpec)


# ---- status -------------------------------------------------------------------------------

Phase = Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


class Condition(SpecModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class Progress(SpecModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    progress_percentage: int | None = None
    estimated_remaining_seconds: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    resumed_from_step: int | None = None
    update_time: str | None = None


class Goodput(SpecModel):
    """Of the paid worker time (workerSeconds), how much went where, in worker-seconds (rank 0's
    facts, from its progress records, times the workers), and in USD at the job's average price
    (estimatedUsd / workerSeconds). The four trainer-fed categories and pendingSeconds only grow."""

    productive_seconds: float = Field(
        0.0, description="Optimizer steps that advanced the job's highest step (first-time training)."
    )
    startup_seconds: float = Field(
        0.0,
        description="Process start to the first step (loading, restore) of the first attempt and of attempts "
        "after non-preemption restarts (failures, suspends, budget stops).",
    )
    checkpoint_blocked_seconds: float = Field(0.0, description="Training time spent in checkpoint saves.")
    lost_to_preemption_seconds: float = Field(
        0.0,
        description="Steps trained again after a resume (recomputed since the last checkpoint) plus the "
        "start-up of every attempt that began after a preemption. 0 for a job never preempted.",
    )
    other_seconds: float = Field(
        0.0, description="workerSeconds minus the four above (evaluation, export, the SIGTERM tail); >= 0."
    )
    pending_seconds: float = Field(
        0.0,
        description="Worker pods' creation to container start (scheduling, node provisioning, image pull); "
        "not part of workerSeconds (not paid), reported because it delays the job.",
    )
    ratio: float = Field(0.0, ge=0, le=1, description="productiveSeconds / workerSeconds.")
    productive_usd: str = Field("0.000000", description="USD of productiveSeconds (decimal string).")
    lost_to_preemption_usd: str = Field("0.000000", description="USD of lostToPreemptionSeconds (decimal string).")


class GoodputFacts(SpecModel):
    """Rank 0's goodput facts of one attempt, in its own seconds (the trainer's ProgressRecord)."""

    productive_seconds: float = 0.0
    recomputed_seconds: float = 0.0
    startup_seconds: float = 0.0
    checkpoint_blocked_seconds: float = 0.0


class GoodputCategories(SpecModel):
    """Worker-seconds by trainer-fed category."""

    productive_seconds: float = 0.0
    startup_seconds: float = 0.0
    checkpoint_blocked_seconds: float = 0.0
    lost_to_preemption_seconds: float = 0.0


class GoodputLedger(SpecModel):
    """The operator's bookkeeping behind cost.goodput, kept in status so that neither its own restart
    nor a new attempt loses facts: the totals of the attempts before `attempt`, and the latest facts
    of `attempt` (rank 0's last progress record of it, polled or its termination message; an attempt
    that vanished keeps its last polled facts). Folded into `finished` when a later attempt reports."""

    finished: GoodputCategories = Field(default_factory=GoodputCategories)
    attempt: int | None = Field(None, description="The attempt `facts` are of.")
    workers: int = Field(1, description="That attempt's workers (its rank 0's seconds count this many times).")
    after_preemption: bool = Field(False, description="That attempt began after a preemption.")
    facts: GoodputFacts = Field(default_factory=GoodputFacts)
    last_ended: int | None = Field(None, description="The last attempt the operator ended.")
    last_ended_by_preemption: bool = Field(False, description="... and whether a preemption ended it.")


class Cost(SpecModel):
    """What the job's worker containers have used, accrued for the time they ran (operator/cost.py),
    and how much of it was goodput (operator/goodput.py). Every total only grows: the operator's
    /metrics exports them as counters."""

    gpu_hours: float = Field(0.0, description="GPU-hours, all capacity types.")
    spot_gpu_hours: float = Field(0.0, description="GPU-hours on spot nodes.")
    on_demand_gpu_hours: float = Field(0.0, description="GPU-hours on on-demand nodes (or nodes no longer known).")
    estimated_usd: str = Field("0.00", description="Estimated USD at the operator's price table; decimal string.")
    on_demand_usd: str = Field(
        "0.00",
        description="What the same worker time would have cost on on-demand nodes (decimal string); "
        "minus estimatedUsd: the spot savings.",
    )
    accrued_until: str | None = Field(None, description="Cost is accrued up to this time (RFC 3339).")
    worker_seconds: float = Field(
        0.0, description="Paid worker container-seconds (container start to end), all workers and attempts."
    )
    cpu_core_hours: float = Field(0.0, description="Requested CPU cores times workerSeconds, in hours.")
    tokens: int = Field(0, description="Tokens trained (the furthest attempt's count; steps trained twice once).")
    usd_per_million_tokens: str | None = Field(
        None, description="estimatedUsd / tokens x 1e6 (decimal string); absent until tokens > 0."
    )
    goodput: Goodput | None = None
    ledger: GoodputLedger | None = Field(None, description="Bookkeeping behind goodput (not a user-facing total).")


class BudgetStatus(SpecModel):
    """What the operator has done about spec.budget (so that its restarts do not repeat it)."""

    warned_for: BudgetSpec | None = Field(
        None,
        description="The spec.budget the BudgetNearlyExceeded warning (80%) was posted for. Posted once per "
        "budget: a changed budget warns again at its own 80%.",
    )
    warned_time: str | None = Field(None, description="When that warning was posted (RFC 3339).")


class Estimate(SpecModel):
    """The right-sizing estimate (kubetune_contract.estimate) of the spec as it is, made before any
    GPU is requested from the facts a sizing pod read (config.json, the dataset's size)."""

    result: Literal["Fits", "WontFit", "FitUnknown", "Failed", "Unavailable"] = Field(
        description="Fits / FitUnknown (no known GPU memory: proceeds) / WontFit (held: Ready=False) / Failed "
        "(the sizing pod hit a user error: held until the spec changes) / Unavailable (the sizing pod failed "
        "otherwise or timed out: proceeds without an estimate)."
    )
    spec_hash: str = Field(description="The estimate-relevant spec it is of; another one is estimated again.")
    inputs_hash: str = Field(description="The base model (and dataset) the sizing facts are of.")
    observed_generation: int | None = None
    time: str | None = Field(None, description="When it was made (RFC 3339).")
    model_facts: dict[str, Any] | None = Field(None, description="config.json's keys the estimator reads.")
    dataset: DatasetFacts | None = Field(None, description="One epoch of the training data (training.epochs jobs).")
    gpu_type: str | None = None
    gpu_memory_gib: float | None = Field(None, alias="gpuMemoryGiB", description="GPU memory per GPU, GiB.")
    gpu_capacity_gib: float | None = Field(None, alias="gpuCapacityGiB", description="Memory of gpuType, GiB.")
    fits: bool | None = Field(None, description="null: unknown (GPU type not in the table, or no estimate).")
    advice: list[dict[str, Any]] | None = Field(
        None, description="Spec changes that would fit: {fields: {path: value}, gpuMemoryGiB, message}."
    )
    breakdown_gib: dict[str, float] | None = Field(None, alias="breakdownGiB")
    parameters: dict[str, int] | None = None
    tokens_to_train: int | None = None
    flops_per_token: float | None = None
    mfu_band: list[float] | None = Field(None, description="The assumed MFU range (low, high).")
    estimated_gpu_hours: dict[str, float] | None = Field(None, description="{low, high}, all GPUs.")
    estimated_wall_hours: dict[str, float] | None = Field(None, description="{low, high}.")
    estimated_usd: dict[str, str] | None = Field(None, description="{low, high} at the operator's price table.")
    usd_per_gpu_hour: list[float] | None = Field(None, description="The (low, high) price used.")
    notes: list[str] | None = None
    error: str | None = Field(None, description="Why the sizing failed (result Failed or Unavailable).")


class WorkerStatus(SpecModel):
    name: str
    rank: int
    attempt: int
    phase: str
    node: str | None = None
    capacity_type: str | None = None


class FineTuneJobStatus(SpecModel):
    phase: Phase | None = None
    message: str | None = None
    observed_generation: int | None = None
    conditions: list[Condition] | None = None
    start_time: str | None = None
    completion_time: str | None = None
    attempt: int | None = Field(None, description="Current set of pods (0-based).")
    preemptions: int | None = None
    restarts: int | None = Field(None, description="Restarts after non-preemption failures.")
    on_demand_fallback: bool | None = None
    progress: Progress | None = None
    last_checkpoint: CheckpointRef | None = None
    output_uri: str | None = None
    cost: Cost | None = None
    budget: BudgetStatus | None = None
    estimate: Estimate | None = None
    workers: list[WorkerStatus] | None = None


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.baseModel.uri"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
    {
        "name": "Progress",
        "type": "integer",
        "jsonPath": ".status.progress.progressPercentage",
        "description": "percent",
    },
    {"name": "Preemptions", "type": "integer", "jsonPath": ".status.preemptions"},
    {"name": "Cost", "type": "string", "jsonPath": ".status.cost.estimatedUsd", "description": "estimated USD"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
