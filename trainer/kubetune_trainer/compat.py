"""Whether a checkpoint fits this run: pure functions over the checkpoint's meta and the config.

Every checkpoint's meta carries `config`, what its tensors and its data position depend on
(`fingerprint`). On resume (this job's own checkpoint after a retry, or another job's through
`checkpoints.resumeFrom`) a difference that makes the checkpoint unusable is a UserError naming the
fields (a LoRA rank or target change would be a shape error, a method or base-model change loads
nonsense, a DeepSpeed preset change reads another format); a data position past the end of this
run's dataset (a smaller dataset) likewise, where it would otherwise be an IndexError.
"""

from __future__ import annotations

from typing import Any

from kubetune_contract.config import TrainerConfig

from .errors import UserError

# field name (as the user writes it) -> why a change breaks the checkpoint
FATAL = {
    "method": "the trainable parameters differ",
    "baseModel.uri": "the weights belong to another model",
    "lora.r": "the adapter matrices change shape",
    "lora.targetModules": "the adapter has other layers",
    "training.deepspeed": "the optimizer state is in another format",
}


def fingerprint(cfg: TrainerConfig) -> dict[str, Any]:
    """What a checkpoint's tensors depend on, by the user's field names (stored in its meta)."""
    lora = cfg.method in ("lora", "qlora")
    return {
        "method": cfg.method,
        "baseModel.uri": cfg.base_model.uri,
        "lora.r": cfg.lora.r if lora else None,
        "lora.targetModules": sorted(cfg.lora.target_modules) if lora else None,
        "training.deepspeed": cfg.training.deepspeed,
    }


def differences(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """The fatal differences, as "field: checkpoint X, this job Y (why)"; [] when it fits or the
    checkpoint predates fingerprints."""
    if not isinstance(saved, dict):
        return []
    out = []
    for name, why in FATAL.items():
        if name in saved and saved[name] != current.get(name):
            out.append(f"{name}: checkpoint {saved[name]!r}, this job {current.get(name)!r} ({why})")
    return out


def check_config(uri: str, meta: dict[str, Any], cfg: TrainerConfig) -> None:
    diffs = differences(meta.get("config"), fingerprint(cfg))
    if diffs:
        raise UserError(
            f"checkpoint {uri} cannot be resumed by this job: {'; '.join(diffs)}. Restore those fields, "
            "or start a new job without checkpoints.resumeFrom"
        )


def check_position(uri: str, st: Any, *, micro_per_epoch: int, global_micro: int, sha256: str) -> None:
    """The checkpoint's place in the data (a `state.TrainState`) must exist in this run's data."""
    same_layout = st.global_micro_batch == global_micro
    micro = st.micro_in_epoch if same_layout else st.sequences_in_epoch // global_micro
    if micro >= micro_per_epoch > 0 and (st.micro_in_epoch or st.sequences_in_epoch):
        saved = st.dataset_sha256 or ""
        changed = "a different dataset" if saved and saved != sha256 else "the same dataset"
        raise UserError(
            f"checkpoint {uri} stands at micro-batch {micro} of epoch {st.epoch}, but this run's dataset has "
            f"only {micro_per_epoch} micro-batches per epoch ({changed}: sha256 {saved[:12] or '?'} in the "
            f"checkpoint, {sha256[:12]} now): dataset.uri or the batch settings changed; restore them, or "
            "start a new job without checkpoints.resumeFrom"
        )
