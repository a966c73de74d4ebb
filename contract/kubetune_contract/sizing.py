"""What a sizing pod tells the operator: the facts the estimator needs that only the job's own
credentials and volumes can reach (the base model's config.json, the dataset's size), in its
termination message as one JSON `SizingRecord`. The operator runs `estimate.estimate` on them
with its price table and the spec as it is now (status.estimate), so an edit of resources or
training settings is re-estimated without another pod.

The sizing pod (`python -m kubetune_trainer size`) runs before any GPU is requested: CPU only,
the trainer image, the job's Secret, service account and volumes. Exit codes as the trainer's
(progress.ExitCode): 0 with phase done; 2 (user error: no config.json, access denied, no
records) and 1 (anything else) with phase failed and the reason in `message`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .config import SpecModel
from .layout import MESSAGE_MAX_CHARS

# The keys of config.json that estimate.ModelArch.from_config reads (all the record carries).
CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "attention_bias",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
)
# Records tokenised to size the dataset; beyond it the counts are extrapolated from the sample
# over every record of the files (which are all read, not tokenised).
SAMPLE_RECORDS = 20_000


def config_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    """The estimator's keys of a config.json; a multimodal config's `text_config` (the decoder)
    stands in for a top level without `hidden_size`."""
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": cfg.get("model_type")}
    return {k: cfg[k] for k in CONFIG_KEYS if k in cfg and cfg[k] is not None}


class DatasetFacts(SpecModel):
    """One epoch of the training data as the trainer builds it (validation split, truncation to
    training.maxSeqLength, packing), for a job given in training.epochs."""

    records: int = Field(ge=0, description="Records in the training files (every one read).")
    sampled_records: int = Field(ge=0, description="Records tokenised; == records when counted in full.")
    sequences: int = Field(ge=0, description="Training sequences per epoch (extrapolated when sampled).")
    tokens: int = Field(ge=0, description="Tokens per epoch after truncation (extrapolated when sampled).")
    counted: Literal["all", "sample"] = Field(description="all: every record tokenised; sample: the first ones.")


class SizingRecord(SpecModel):
    """The sizing pod's report (its termination message)."""

    phase: Literal["done", "failed"]
    model_facts: dict[str, Any] = Field(
        default_factory=dict, description="config.json's CONFIG_KEYS (estimate.ModelArch.from_config reads them)."
    )
    dataset: DatasetFacts | None = Field(None, description="Absent when training.maxSteps is given.")
    message: str | None = Field(None, max_length=MESSAGE_MAX_CHARS, description="Why it failed.")
    seconds: float = Field(0.0, ge=0, description="Wall time of the sizing.")
