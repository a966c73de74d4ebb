"""The result: the adapter (or the full model) + tokenizer + model_card.json, uploaded to
<output.uri>/<namespace>/<name>/; with output.mergeWeights also base+adapter merged weights under
merged/ (the base is reloaded unquantised on CPU, so this works for qlora too)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune_contract.config import TrainerConfig

from . import logs
from .state import TrainingParts, TrainState

MODEL_CARD = "model_card.json"


@dataclass(frozen=True)
class RunFacts:
    """What the model card says about the run that produced the output."""

    state: TrainState
    precision: str  # the resolved precision: bf16 | fp16 | fp32
    world_size: int
    dataset_sha256: str
    records: int
    bad_records: int
    train_sequences: int
    eval_sequences: int
    wall_time_seconds: float  # all attempts
    gpu_seconds: float  # all attempts
    resumed_from_step: int | None
    attempt: int | None
    goodput: Any = None  # goodput.Goodput of this attempt: the card's goodput and cost sections
    job_cost: str | None = None  # KUBETUNE_JOB_COST: the earlier attempts' totals


def output_uri(cfg: TrainerConfig) -> str:
    return cfg.output_prefix


def model_card(cfg: TrainerConfig, facts: RunFacts) -> dict:
    st = facts.state
    try:
        from importlib.metadata import version

        trainer_version = version("kubetune")
    except Exception:
        trainer_version = "unknown"
    return {
        "base_model": {"uri": cfg.base_model.uri, "revision": cfg.base_model.revision},
        "method": cfg.method,
        "hyperparameters": {
            "training": cfg.training.to_json_dict(),
            **({"lora": cfg.lora.to_json_dict()} if cfg.method in ("lora", "qlora") else {}),
            "precision_resolved": facts.precision,
            "world_size": facts.world_size,
        },
        "dataset": {
            "uri": cfg.dataset.uri,
            "format": cfg.dataset.format,
            "sha256": facts.dataset_sha256,
            "validation_uri": cfg.dataset.validation_uri,
            "validation_split": cfg.dataset.validation_split,
            "records": facts.records,
            "bad_records": facts.bad_records,
            "train_sequences": facts.train_sequences,
            "eval_sequences": facts.eval_sequences,
        },
        "steps": st.global_step,
        "epochs_completed": st.epoch,
        "tokens_seen": st.tokens_seen,
        "samples_seen": st.samples_seen,
        "final_train_loss": st.last_loss,
        "final_eval_loss": st.last_eval_loss,
        "wall_time_seconds": round(facts.wall_time_seconds, 3),
        "gpu_hours": round(facts.gpu_seconds / 3600.0, 6),
        "resumed_from_step": facts.resumed_from_step,
        "job": {"namespace": cfg.job.namespace, "name": cfg.job.name, "uid": cfg.job.uid, "attempt": facts.attempt},
        "trainer_version": trainer_version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **_job_card(facts),
    }


def _job_card(facts: RunFacts) -> dict:
    if facts.goodput is None:
        return {}
    from .goodput import job_card

    return job_card(facts.job_cost, facts.goodput, facts.state.tokens_seen)


def export_output(
    cfg: TrainerConfig,
    parts: TrainingParts,
    tokenizer: Any,
    model_src: str,
    facts: Callable[[], RunFacts],
    *,
    rank0: bool,
    out_dir: Path,
    client: Any,
) -> str:
    """Write the result into out_dir and upload it (rank 0); every rank must call it (ZeRO-3
    gathers). `facts` is called when the model card is written, so its wall time includes the
    export itself."""
    from . import s3
    from .model import is_peft
    from .zero import gathered_state_dict

    uri = output_uri(cfg)
    gathered = gathered_state_dict(cfg, parts, rank0)  # ZeRO-3: consolidated / gathered on rank 0
    if not rank0:
        return uri
    out = out_dir
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = parts.model
    if gathered is not None:
        if is_peft(model):
            from peft import get_peft_model_state_dict

            model.save_pretrained(out, state_dict=get_peft_model_state_dict(model, state_dict=gathered))
        else:
            model.save_pretrained(out, state_dict=gathered)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if cfg.output.merge_weights and cfg.method in ("lora", "qlora"):
        _merge(cfg, model_src, tokenizer, facts().precision, out)
    card = model_card(cfg, facts())
    (out / MODEL_CARD).write_text(json.dumps(card, indent=2))
    t0 = logs.monotonic()
    sizes = s3.upload_dir(client, out, uri)
    logs.log(
        "output_uploaded", uri=uri, files=len(sizes), bytes=sum(sizes.values()), seconds=round(logs.monotonic() - t0, 2)
    )
    return uri


def _merge(cfg: TrainerConfig, model_src: str, tokenizer: Any, precision: str, out: Path) -> None:
    """Base (unquantised, CPU) + the saved adapter, merged, to out/merged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else (torch.float16 if precision == "fp16" else torch.float32)
    base = AutoModelForCausalLM.from_pretrained(
        model_src, dtype=dtype, revision=cfg.base_model.revision, trust_remote_code=cfg.base_model.trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    logs.log("merged_weights_written", path=str(out / "merged"))
    del merged, base
