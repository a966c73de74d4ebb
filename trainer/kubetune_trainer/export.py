"""The result: the adapter (or the full model) + tokenizer + model_card.json, uploaded to
<output.uri>/<namespace>/<name>/; with output.mergeWeights also base+adapter merged weights under
merged/ (the base is reloaded unquantised on CPU, so this works for qlora too)."""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from . import logs

if TYPE_CHECKING:  # pragma: no cover
    from .train import Run

MODEL_CARD = "model_card.json"


def output_uri(cfg) -> str:
    return cfg.output_prefix


def model_card(run: "Run") -> dict:
    from .train import attempt_number

    cfg, st = run.cfg, run.state
    elapsed = run.progress.elapsed()
    gpu_seconds = run.gpu_seconds()
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
            "precision_resolved": run.precision.name,
            "world_size": run.env.world,
        },
        "dataset": {
            "uri": cfg.dataset.uri, "format": cfg.dataset.format, "sha256": run.dataset_sha,
            "validation_uri": cfg.dataset.validation_uri, "validation_split": cfg.dataset.validation_split,
            "records": run.report.records, "bad_records": run.report.bad_count,
            "train_sequences": len(run.train_seqs), "eval_sequences": len(run.eval_seqs),
        },
        "steps": st.global_step,
        "epochs_completed": st.epoch,
        "tokens_seen": st.tokens_seen,
        "samples_seen": st.samples_seen,
        "final_train_loss": st.last_loss,
        "final_eval_loss": st.last_eval_loss,
        "wall_time_seconds": round(elapsed, 3),
        "gpu_hours": round(gpu_seconds / 3600.0, 6),
        "resumed_from_step": run.resumed_from,
        "job": {"namespace": cfg.job.namespace, "name": cfg.job.name, "uid": cfg.job.uid,
                "attempt": attempt_number()},
        "trainer_version": trainer_version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _gathered_state_dict(run: "Run") -> dict | None:
    """Trainable (lora) or all (full) weights on rank 0, gathered from ZeRO-3 partitions if needed."""
    model = run.model
    if run.ds_engine is not None and run.cfg.training.deepspeed.startswith("zero3"):
        import deepspeed

        params = [p for _, p in run.trainable] if run.cfg.method != "full" else list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if run.rank0:
                names = {id(p): n for n, p in model.named_parameters()}
                return {names[id(p)]: p.detach().cpu().clone() for p in params}
            return None
    return None


def export_output(run: "Run") -> str:
    """Write and upload the result (rank 0); every rank must call it (ZeRO-3 gathers)."""
    from . import s3
    from .model import is_peft

    cfg = run.cfg
    uri = output_uri(cfg)
    gathered = _gathered_state_dict(run)
    if not run.rank0:
        return uri
    out = run.work / "output"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = run.model
    if gathered is not None:
        if is_peft(model):
            from peft import get_peft_model_state_dict

            model.save_pretrained(out, state_dict=get_peft_model_state_dict(model, state_dict=gathered))
        else:
            model.save_pretrained(out, state_dict=gathered)
    else:
        model.save_pretrained(out)
    run.tokenizer.save_pretrained(out)
    if cfg.output.merge_weights and cfg.method in ("lora", "qlora"):
        _merge(run, out)
    card = model_card(run)
    (out / MODEL_CARD).write_text(json.dumps(card, indent=2))
    t0 = logs.monotonic()
    sizes = s3.upload_dir(run.client(), out, uri)
    logs.log("output_uploaded", uri=uri, files=len(sizes), bytes=sum(sizes.values()),
             seconds=round(logs.monotonic() - t0, 2))
    return uri


def _merge(run: "Run", out: Path) -> None:
    """Base (unquantised, CPU) + the saved adapter, merged, to out/merged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if run.precision.name == "bf16" else (
        torch.float16 if run.precision.name == "fp16" else torch.float32)
    base = AutoModelForCausalLM.from_pretrained(
        run.model_src, dtype=dtype, revision=run.cfg.base_model.revision,
        trust_remote_code=run.cfg.base_model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    merged.save_pretrained(out / "merged")
    run.tokenizer.save_pretrained(out / "merged")
    logs.log("merged_weights_written", path=str(out / "merged"))
    del merged, base
