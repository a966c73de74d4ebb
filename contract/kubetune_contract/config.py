"""The trainer config: everything one trainer process needs, rendered by the operator.

The operator renders a `TrainerConfig` into a ConfigMap mounted at `layout.CONFIG_PATH`; the
trainer reads it back with `TrainerConfig.load()`. The training-facing parts of the FineTuneJob
spec (`ModelSpec`, `DatasetSpec`, `LoraSpec`, `TrainingSpec`, `CheckpointSpec`, `OutputSpec`,
`S3Spec`) are these very models: the CRD schema is generated from them
(`kubetune_operator.crdgen`), so the API a user writes and the file a trainer reads cannot drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .layout import CONFIG_PATH
from .uris import S3_URI_PATTERN, job_prefix


class SpecModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ModelSpec(SpecModel):
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


class FieldMapping(SpecModel):
    """Which record fields hold the data, per format."""

    text: str = Field("text", description="text format: the field with the training text.")
    prompt: str = Field("prompt", description="instruction format: the prompt field.")
    response: str = Field("response", description="instruction format: the response field.")
    system: str | None = Field(None, description="instruction format: optional system-prompt field.")
    messages: str = Field("messages", description="chat format: the list of {role, content} messages.")


class DatasetSpec(SpecModel):
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
    validation_uri: str | None = Field(
        None, max_length=1024, description="Separate evaluation data; overrides validationSplit."
    )
    max_bad_record_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Preflight fails when more than this fraction of records is malformed."
    )


class LoraSpec(SpecModel):
    """PEFT LoRA parameters (used by lora and qlora)."""

    r: int = Field(16, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: int = Field(32, ge=1, le=4096, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input. 0 (the default) skips the dropout pass and its mask "
        "on every adapted Linear; QLoRA's paper used 0.05-0.1 for small models.",
    )
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
# Word values, not on/off/true/false: YAML 1.1 (kubectl, PyYAML) reads an unquoted on/off as a boolean.
GradientCheckpointing = Literal["auto", "always", "never", "offload"]
Liger = Literal["auto", "always", "never"]
Compile = Literal["none", "regional"]
Attention = Literal["auto", "flash_attention_2"]
_LEGACY_BOOL = {True: "always", False: "never"}


class TrainingSpec(SpecModel):
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
    gradient_checkpointing: GradientCheckpointing = Field(
        "auto",
        description="Recompute activations in backward instead of keeping them: never | always | offload "
        "(always, with the kept layer inputs in pinned host memory) | auto (the trainer checks the estimate "
        "against its GPU's memory: never when the job fits without, else the fewest checkpointed layers that "
        "fit; never on CPU).",
    )
    gradient_checkpointing_every_n_layers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="With always/offload: checkpoint only every n-th decoder layer (1 = every layer, the "
        "default); the others keep their activations, trading memory back for speed.",
    )
    liger: Liger = Field(
        "auto",
        description="Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU): auto = on CUDA for "
        "supported architectures when liger-kernel is installed; always = required (an error names what is "
        "missing); never.",
    )
    compile: Compile = Field(
        "none", description="regional = torch.compile each decoder layer (needs a C compiler; first steps slower)."
    )
    attention: Attention = Field(
        "auto",
        description="auto = padding-free varlen attention over torch's SDPA kernels; flash_attention_2 = the "
        "flash-attn package (in the image), padding-free through cu_seqlens.",
    )
    seed: int = Field(42, ge=0, le=2**31 - 1)
    deepspeed: DeepSpeedPreset = Field("none", description="DeepSpeed ZeRO preset (GPU only).")
    logging_steps: int = Field(10, ge=1, description="Log and publish progress every N steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: at the end).")

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _legacy_bool(cls, v: Any) -> Any:
        """Configs written before the modes were booleans (true = always, false = never)."""
        return _LEGACY_BOOL.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _needs_a_length(self) -> TrainingSpec:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("training: set maxSteps or epochs")
        if self.gradient_checkpointing_every_n_layers is not None and self.gradient_checkpointing not in (
            "always",
            "offload",
        ):
            raise ValueError("training.gradientCheckpointingEveryNLayers needs gradientCheckpointing always or offload")
        return self


class CheckpointSpec(SpecModel):
    """Where and how often the trainer checkpoints."""

    uri: str = Field(
        pattern=S3_URI_PATTERN,
        max_length=1024,
        description="s3://bucket/prefix; each job writes under <prefix>/<namespace>/<name>/<uid>/.",
    )
    every_steps: int | None = Field(200, ge=1, description="Checkpoint every N optimizer steps.")
    every_minutes: float | None = Field(10.0, gt=0, le=1440, description="and/or every M minutes of training.")
    keep_last: int = Field(3, ge=1, le=100, description="Checkpoints kept; older ones are deleted.")
    resume_from: str | None = Field(
        None,
        pattern=S3_URI_PATTERN,
        max_length=1024,
        description="Start from another job's checkpoint (a warm start, or a re-created job continuing an old "
        "one): s3://.../step-<n>-a<attempt> for that checkpoint, or a job's prefix "
        "(s3://bucket/prefix/<namespace>/<name>/<uid>) for its newest valid one. Used only while this job "
        "has no checkpoint of its own; without it a job never restores a checkpoint it did not write.",
    )


class OutputSpec(SpecModel):
    """Where the result goes."""

    uri: str = Field(
        pattern=S3_URI_PATTERN,
        max_length=1024,
        description="s3://bucket/prefix for the adapter (or full model) and its model card.",
    )
    merge_weights: bool = Field(False, description="Also write base+adapter merged weights.")


class SecretKeyRefs(SpecModel):
    """A Secret holding S3 credentials."""

    name: str = Field(min_length=1, max_length=253, description="Secret name, in the job's namespace.")
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID", description="Key of the access key id.")
    secret_access_key_key: str = Field("AWS_SECRET_ACCESS_KEY", description="Key of the secret key.")


class S3Spec(SpecModel):
    """How to reach S3 for every s3:// URI in the job (AWS, MinIO or another S3-compatible store)."""

    endpoint: str | None = Field(
        None, pattern=r"^https?://[^\s/]+(/.*)?$", max_length=512, description="Endpoint URL; empty means AWS."
    )
    region: str = Field("us-east-1", max_length=64)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        """A URL urllib and boto3 can use: a host, a port in range, no credentials in it (they would
        be echoed into status and logs; use credentialsSecret)."""
        if not v:
            return v
        from urllib.parse import urlsplit

        try:
            url = urlsplit(v)
            port = url.port
        except ValueError as e:
            raise ValueError(f"not a usable URL ({e})") from None
        if url.username is not None or url.password is not None:
            raise ValueError("must not carry credentials (user:password@); use credentialsSecret")
        if not url.hostname:
            raise ValueError("has no host")
        if port == 0:
            raise ValueError("port 0 is not a port")
        return v

    force_path_style: bool = Field(True, description="Path-style addressing (what MinIO needs).")
    credentials_secret: SecretKeyRefs | None = Field(
        None, description="Secret with the keys; omit to use the pod's ambient identity (IRSA, instance role)."
    )


class JobRef(SpecModel):
    """Which FineTuneJob a trainer works for (the attempt number comes in envvars.ATTEMPT)."""

    name: str
    namespace: str
    uid: str


class TrainerConfig(SpecModel):
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
        """The job's own prefix, <checkpoints.uri>/<namespace>/<name>/<uid>: checkpoints of two jobs
        (or two incarnations of one name) never mix, and resume survives attempts."""
        return job_prefix(self.checkpoints.uri, self.job.namespace, self.job.name, self.job.uid)

    @property
    def output_prefix(self) -> str:
        """Where the job's result goes: <output.uri>/<namespace>/<name>/<uid>."""
        return job_prefix(self.output.uri, self.job.namespace, self.job.name, self.job.uid)

    def dumps(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> TrainerConfig:
        return cls.model_validate_json(text)

    @classmethod
    def load(cls, path: str | Path = CONFIG_PATH) -> TrainerConfig:
        return cls.loads(Path(path).read_text())
