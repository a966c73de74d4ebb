"""The result: the adapter (or the full model) + tokenizer + model_card.json, uploaded to
<output.uri>/<namespace>/<name>/<uid>/; with output.mergeWeights also base+adapter merged weights
under merged/ (the base is reloaded unquantised on CPU, so this works for qlora too).

Order, so that nothing risky can lose the result: the last step's checkpoint is durable before
export starts (`train`); the adapter, tokenizer and card are uploaded before any merge; the merge
runs in a child process (`merge`), so running out of memory there kills the child, not the
trainer, and ends the job with the adapter in place and a message saying so. An upload that S3
refuses (AccessDenied, missing bucket) is a UserError naming the prefix, the permission and the
final checkpoint, which `checkpoints.resumeFrom` on a new job exports without retraining; a
transient failure exits RETRIABLE and the retried attempt resumes at the last step and only
re-exports. Before uploading, the attempt checks it still owns the job (`fence`)."""

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
from .errors import UserError
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
    fence: Callable[[str], None] | None = None,
    checkpoint: Any = None,
) -> str:
    """Write the result into out_dir and upload it (rank 0); every rank must call it (ZeRO-3
    gathers). `facts` is called when the model card is written, so its wall time includes the
    export itself."""
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
    merge = cfg.output.merge_weights and cfg.method in ("lora", "qlora")
    card = model_card(cfg, facts())
    if merge:
        card["merged_weights"] = "pending"
    (out / MODEL_CARD).write_text(json.dumps(card, indent=2))
    _upload(client, out, uri, fence, checkpoint, "output_uploaded")  # the adapter first: durable before a merge
    if merge:
        precision = facts().precision
        try:
            _merge_in_child(cfg, model_src, precision, out, uri)
        except UserError as e:
            card["merged_weights"] = f"failed: {e}"
            (out / MODEL_CARD).write_text(json.dumps(card, indent=2))
            _upload_files(client, {MODEL_CARD: out / MODEL_CARD}, uri, fence, checkpoint)
            raise
        card["merged_weights"] = "merged/"
        (out / MODEL_CARD).write_text(json.dumps(card, indent=2))
        _upload(client, out / "merged", f"{uri}/merged", fence, checkpoint, "merged_uploaded")
        _upload_files(client, {MODEL_CARD: out / MODEL_CARD}, uri, fence, checkpoint)
    return uri


def _upload(client: Any, src: Path, uri: str, fence: Any, checkpoint: Any, event: str) -> None:
    from . import s3

    t0 = logs.monotonic()
    files = {rel: p for rel, p in s3.local_files(src).items() if not rel.startswith("merged/")}
    _upload_files(client, files, uri, fence, checkpoint)
    nbytes = sum(p.stat().st_size for p in files.values())
    logs.log(event, uri=uri, files=len(files), bytes=nbytes, seconds=round(logs.monotonic() - t0, 2))


def _upload_files(client: Any, files: dict[str, Path], uri: str, fence: Any, checkpoint: Any) -> None:
    from . import s3

    if fence is not None:
        fence(f"uploading the output to {uri}")
    try:
        s3.upload_files(client, files, s3.parse_s3_uri(uri, field="output.uri"))
    except UserError as e:
        raise UserError(output_failure(uri, str(e), checkpoint)) from e


def output_failure(uri: str, error: str, checkpoint: Any) -> str:
    """The message of an output upload S3 refused: the prefix, the permission, the checkpoint kept."""
    kept = (
        f"The final checkpoint {checkpoint.uri} (step {checkpoint.step}) is kept: after fixing it, a new job with "
        f"checkpoints.resumeFrom: {checkpoint.uri} exports it without retraining."
        if checkpoint is not None
        else "The job's checkpoints are kept."
    )
    return (
        f"uploading the result to {uri}/ failed: the credentials need s3:PutObject on {uri}/* "
        f"(and the bucket must exist): {error}. {kept}"
    )


def _merge_in_child(cfg: TrainerConfig, model_src: str, precision: str, out: Path, uri: str) -> None:
    """out/merged from the base and out's adapter, in a child process (`merge`): an out-of-memory
    kill there leaves this process, and the adapter already uploaded, intact."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "kubetune_trainer.merge", model_src, str(out), str(out / "merged"), precision]
    args += [cfg.base_model.revision or "", "1" if cfg.base_model.trust_remote_code else "0"]
    t0 = logs.monotonic()
    logs.log("merge_started", base=cfg.base_model.uri, precision=precision)
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        killed = proc.returncode in (-9, 137)
        why = (
            "it was killed (out of memory: the merge loads the whole base model unquantised on the CPU; "
            "raise the workers' memory or set output.mergeWeights false)"
            if killed
            else f"it exited {proc.returncode}: {proc.stderr.strip()[-600:]}"
        )
        raise UserError(f"merging the adapter into the base model failed: {why}. The adapter is at {uri}/")
    logs.log("merged_weights_written", path=str(out / "merged"), seconds=round(logs.monotonic() - t0, 2))
