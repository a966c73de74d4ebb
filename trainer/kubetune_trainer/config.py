"""The operator↔trainer contract, defined once (pure: no torch, no kubernetes).

The operator renders a `TrainerConfig` into a ConfigMap mounted at `CONFIG_PATH`; the trainer
reads it back with `TrainerConfig.load()`. The training-facing parts of the FineTuneJob spec
(`ModelSpec`, `DatasetSpec`, `LoraSpec`, `TrainingSpec`, `CheckpointSpec`, `OutputSpec`,
`S3Spec`) are these very models: the CRD schema is generated from them
(`kubetune_operator.crdgen`), so the API a user writes and the file a trainer reads cannot drift.

Also here: the environment variables the operator sets, the trainer's exit codes, and the
progress record the trainer serves and the operator copies into the job's status.
"""
from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

CONFIG_PATH = "/etc/kubetune/trainer-config.json"
CONFIG_KEY = "trainer-config.json"  # key in the ConfigMap

# Environment the operator sets on every trainer container (torch.distributed names where they exist).
ENV_CONFIG = "KUBETUNE_CONFIG"  # path to the config file (default CONFIG_PATH)
ENV_RANK = "RANK"
ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_POD_NAME = "KUBETUNE_POD_NAME"
ENV_NODE_NAME = "KUBETUNE_NODE_NAME"
ENV_ATTEMPT = "KUBETUNE_ATTEMPT"  # 0-based; bumped for each new set of pods (after a preemption)
ENV_METRICS_PORT = "KUBETUNE_METRICS_PORT"
# S3 credentials come from the user's Secret through these standard names (boto3 reads them).
ENV_S3_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_S3_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"

METRICS_PORT = 9400  # trainer's HTTP port: /metrics (Prometheus) and /progress (ProgressRecord JSON)
RENDEZVOUS_PORT = 29500
TERMINATION_LOG = "/dev/termination-log"  # the final ProgressRecord, read by the operator

# pvc://claim/path URIs: the operator mounts claim <claim> (read-only) at PVC_MOUNT_ROOT/<claim>,
# and the trainer reads <path> below it.
PVC_MOUNT_ROOT = "/mnt/kubetune/pvc"


def pvc_claim(uri: str) -> str | None:
    """The PersistentVolumeClaim named by a pvc://claim/path URI, else None."""
    if not uri.startswith("pvc://"):
        return None
    claim = uri[len("pvc://"):].split("/", 1)[0]
    return claim or None


def local_path_for_uri(uri: str, pvc_root: str = PVC_MOUNT_ROOT) -> str | None:
    """Where the trainer finds `uri` on its own filesystem, or None when it is not local.

    pvc://claim/a/b -> <pvc_root>/claim/a/b; file:///x -> /x; an absolute path stays itself;
    s3:// URIs and hub ids (org/name) -> None. Pure: no filesystem access.
    """
    if uri.startswith("pvc://"):
        claim = pvc_claim(uri)
        if claim is None:
            return None
        rest = uri[len("pvc://") + len(claim):].strip("/")
        parts = [p for p in rest.split("/") if p not in ("", ".")]
        if ".." in parts:
            return None  # never escape the claim's mount
        return "/".join([pvc_root.rstrip("/"), claim, *parts])
    if uri.startswith("file://"):
        return uri[len("file://"):] or None
    if uri.startswith("/"):
        return uri
    return None


class ExitCode(enum.IntEnum):
    """How a trainer process ends; the operator decides retries from these."""

    SUCCESS = 0
    RETRIABLE = 1  # infrastructure failure (network, S3 5xx, OOM-kill shows as 137): retry
    USER_ERROR = 2  # bad config or data, missing bucket, bad credentials: do not retry
    PREEMPTED = 3  # SIGTERM received and a checkpoint was made durable: resume elsewhere


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ModelSpec(_Model):
    """The base model to fine-tune."""

    uri: str = Field(
        min_length=1,
        max_length=1024,
        description="Hub id (org/name), s3://bucket/prefix of a saved model, or pvc://claim/path "
        "(mounted read-only); the trainer sees pvc:// as a local directory.",
    )
    revision: str | None = Field(None, max_length=256, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Allow model code from the model repository.")


DatasetFormat = Literal["text", "instruction", "chat"]


class FieldMapping(_Model):
    """Which record fields hold the data, per format."""

    text: str = Field("text", description="text format: the field with the training text.")
    prompt: str = Field("prompt", description="instruction format: the prompt field.")
    response: str = Field("response", description="instruction format: the response field.")
    system: str | None = Field(None, description="instruction format: optional system-prompt field.")
    messages: str = Field("messages", description="chat format: the list of {role, content} messages.")


class DatasetSpec(_Model):
    """Training data: JSONL or Parquet."""

    uri: str = Field(
        min_length=1,
        max_length=1024,
        description="s3://bucket/key (a file or a prefix of .jsonl/.parquet files), hub id, or pvc://claim/path.",
    )
    format: DatasetFormat = Field("instruction", description="text | instruction | chat.")
    fields: FieldMapping = Field(default_factory=FieldMapping, description="Record field names.")
    validation_split: float = Field(
        0.0, ge=0.0, le=0.5, description="Fraction of records held out for evaluation (0 disables)."
    )
    validation_uri: str | None = Field(None, max_length=1024, description="Separate evaluation data; overrides validationSplit.")
    max_bad_record_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Preflight fails when more than this fraction of records is malformed."
    )


class LoraSpec(_Model):
    """PEFT LoRA parameters (used by lora and qlora)."""

    r: int = Field(16, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: int = Field(32, ge=1, le=4096, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="Module names to adapt, or [all-linear] for every linear layer but the output head.",
    )


Method = Literal["lora", "qlora", "full"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
LrScheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
DeepSpeedPreset = Literal["none", "zero2", "zero2-offload", "zero3", "zero3-offload"]


class TrainingSpec(_Model):
    """Optimisation hyper-parameters. Give maxSteps or epochs."""

    epochs: float | None = Field(None, gt=0, le=1000, description="Passes over the data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="Optimizer steps; wins over epochs.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: LrScheduler = Field("cosine", description="Learning-rate schedule after warm-up.")
    warmup_ratio: float = Field(0.03, ge=0, le=0.5, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 disables).")
    batch_size: int = Field(4, ge=1, le=4096, description="Sequences per device per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    max_seq_length: int = Field(1024, ge=16, le=262_144, description="Tokens per sequence after packing/truncation.")
    packing: bool = Field(True, description="Pack short examples into full-length sequences.")
    precision: Precision = Field("auto", description="auto = bf16 on GPUs that support it, else fp32.")
    gradient_checkpointing: bool = Field(True, description="Trade compute for activation memory.")
    seed: int = Field(42, ge=0, le=2**31 - 1)
    deepspeed: DeepSpeedPreset = Field("none", description="DeepSpeed ZeRO preset (GPU only).")
    logging_steps: int = Field(10, ge=1, description="Log and publish progress every N steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: at the end).")

    @model_validator(mode="after")
    def _needs_a_length(self) -> "TrainingSpec":
        if self.epochs is None and self.max_steps is None:
            raise ValueError("training: set maxSteps or epochs")
        return self


class CheckpointSpec(_Model):
    """Where and how often the trainer checkpoints."""

    uri: str = Field(
        pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$",
        max_length=1024,
        description="s3://bucket/prefix; each job writes under <prefix>/<namespace>/<name>/.",
    )
    every_steps: int | None = Field(200, ge=1, description="Checkpoint every N optimizer steps.")
    every_minutes: float | None = Field(10.0, gt=0, le=1440, description="and/or every M minutes of training.")
    keep_last: int = Field(3, ge=1, le=100, description="Checkpoints kept; older ones are deleted.")


class OutputSpec(_Model):
    """Where the result goes."""

    uri: str = Field(
        pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$",
        max_length=1024,
        description="s3://bucket/prefix for the adapter (or full model) and its model card.",
    )
    merge_weights: bool = Field(False, description="Also write base+adapter merged weights.")


class SecretKeyRefs(_Model):
    """A Secret holding S3 credentials."""

    name: str = Field(min_length=1, max_length=253, description="Secret name, in the job's namespace.")
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID", description="Key of the access key id.")
    secret_access_key_key: str = Field("AWS_SECRET_ACCESS_KEY", description="Key of the secret key.")


class S3Spec(_Model):
    """How to reach S3 for every s3:// URI in the job (AWS, MinIO or another S3-compatible store)."""

    endpoint: str | None = Field(
        None, pattern=r"^https?://[^\s/]+(/.*)?$", max_length=512, description="Endpoint URL; empty means AWS."
    )
    region: str = Field("us-east-1", max_length=64)
    force_path_style: bool = Field(True, description="Path-style addressing (what MinIO needs).")
    credentials_secret: SecretKeyRefs | None = Field(
        None, description="Secret with the keys; omit to use the pod's ambient identity (IRSA, instance role)."
    )


class JobRef(_Model):
    """Which FineTuneJob a trainer works for (the attempt number comes in ENV_ATTEMPT)."""

    name: str
    namespace: str
    uid: str


class TrainerConfig(_Model):
    """Everything one trainer process needs, rendered by the operator."""

    job: JobRef
    base_model: ModelSpec
    dataset: DatasetSpec
    method: Method
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec
    checkpoints: CheckpointSpec
    output: OutputSpec
    s3: S3Spec = Field(default_factory=S3Spec)
    gpus_per_worker: int = Field(0, ge=0)
    workers: int = Field(1, ge=1)
    progress_interval_seconds: float = Field(10.0, gt=0, description="Throttle for the progress record.")

    @property
    def checkpoint_prefix(self) -> str:
        """The job's own prefix: checkpoints of two jobs never mix, and resume survives attempts."""
        return f"{self.checkpoints.uri.rstrip('/')}/{self.job.namespace}/{self.job.name}"

    def dumps(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> "TrainerConfig":
        return cls.model_validate_json(text)

    @classmethod
    def load(cls, path: str | Path = CONFIG_PATH) -> "TrainerConfig":
        return cls.loads(Path(path).read_text())


class CheckpointRef(_Model):
    uri: str
    step: int
    time: str  # RFC 3339


class ProgressRecord(_Model):
    """What the trainer reports (GET /progress, and the termination message at exit)."""

    phase: Literal["starting", "preflight", "loading", "training", "checkpointing", "uploading", "done", "failed"]
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    tokens_seen: int = 0
    resumed_from_step: int | None = None
    last_checkpoint: CheckpointRef | None = None
    output_uri: str | None = None
    message: str | None = Field(None, max_length=2048, description="Why it failed, for user errors.")
    elapsed_seconds: float = 0.0
    steps_per_second: float | None = None

    @property
    def progress_percentage(self) -> int | None:
        if not self.total_steps:
            return None
        return max(0, min(100, int(100 * self.step / self.total_steps)))

    @property
    def estimated_remaining_seconds(self) -> int | None:
        if not self.total_steps or not self.steps_per_second:
            return None
        return max(0, int((self.total_steps - self.step) / self.steps_per_second))
