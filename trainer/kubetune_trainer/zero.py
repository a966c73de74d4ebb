"""DeepSpeed ZeRO: the presets, the engine, its checkpoints and the export of what it trained.

- Presets are data files in kubetune_trainer/deepspeed/*.json; every "auto" is filled from the
  TrainingSpec, bf16/fp16 from the job's resolved precision. Their optimizer is DeepSpeed's
  `torch_adam` (torch.optim.AdamW), so no op is compiled at run time (FusedAdam would JIT with
  nvcc); the -offload presets keep that torch AdamW on the CPU, over the offloaded fp32
  partitions (`zero_force_ds_cpu_optimizer: false`; DeepSpeedCPUAdam would JIT with g++).
- ZeRO-3 loads the model under `zero.Init` (transformers' HfDeepSpeedConfig, kept alive from
  before `from_pretrained` to the end of the run): each rank holds only its partition from the start.
- Checkpoints: `engine.save_checkpoint(..., exclude_frozen_parameters=True)`, so a LoRA/QLoRA
  checkpoint holds the adapters and their optimizer state, never the frozen base. Every rank
  writes its own shards (`zero_pp_rank_<r>_...`); the store uploads each rank's files and commits
  one manifest over all of them (checkpoint.py).
- Export: full fine-tuning under ZeRO-3 is consolidated into one 16-bit (the training dtype)
  state dict on rank 0 (`engine._zero3_consolidated_16bit_state_dict`); PEFT adapters under ZeRO-3
  are gathered (`zero.GatheredParameters`) before `save_pretrained`. Under ZeRO-2 every rank holds
  the whole module, so rank 0 saves it as is.
- On a machine without CUDA DeepSpeed runs only under KUBETUNE_FORCE_CPU=1 (tests, CPU demos):
  `DS_ACCELERATOR=cpu` is then set for the library and torch.distributed uses gloo.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from kubetune_contract.config import TrainerConfig

from .errors import UserError

PRESETS = ("zero2", "zero2-offload", "zero3", "zero3-offload")
TAG = "state"  # the one tag of the engine's checkpoint directory
DS_ACCELERATOR = "DS_ACCELERATOR"  # DeepSpeed's own variable (written for the library, never read back)

_hf_ds_config: Any = None  # transformers keeps only a weak reference: ours keeps it alive (ZeRO-3)


def enabled(cfg: TrainerConfig) -> bool:
    return cfg.training.deepspeed != "none"


def is_zero3(cfg: TrainerConfig) -> bool:
    return cfg.training.deepspeed.startswith("zero3")


def check_supported(cfg: TrainerConfig, cuda: bool, force_cpu: bool) -> None:
    """DeepSpeed needs CUDA, or the explicit KUBETUNE_FORCE_CPU=1 knob (then it runs on the CPU)."""
    if enabled(cfg) and not cuda and not force_cpu:
        raise UserError(
            f"training.deepspeed={cfg.training.deepspeed} needs GPUs; set deepspeed: none for CPU training "
            "(KUBETUNE_FORCE_CPU=1 runs DeepSpeed on the CPU, for tests)"
        )


def require(cuda: bool) -> Any:
    """The deepspeed module (CPU accelerator when this process trains without CUDA)."""
    if not cuda:
        os.environ.setdefault(DS_ACCELERATOR, "cpu")
    try:
        import deepspeed
    except Exception as e:
        raise UserError(
            "training.deepspeed needs the deepspeed package, which this trainer image lacks "
            f"({e}); build it with EXTRAS=trainer,gpu,deepspeed (Dockerfile.trainer)"
        ) from None
    return deepspeed


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise UserError(f"training.deepspeed: unknown preset {name!r} (one of {', '.join(PRESETS)})")
    text = resources.files("kubetune_trainer").joinpath("deepspeed", f"{name}.json").read_text()
    return json.loads(text)


def config(cfg: TrainerConfig, precision: Any) -> dict:
    """A preset with every "auto" filled from the TrainingSpec and the resolved precision."""
    t = cfg.training
    ds = preset(t.deepspeed)

    def fill(d: dict, key: str, value: Any) -> None:
        if d.get(key) == "auto":
            d[key] = value

    fill(ds, "train_micro_batch_size_per_gpu", t.batch_size)
    fill(ds, "gradient_accumulation_steps", t.gradient_accumulation_steps)
    fill(ds, "gradient_clipping", t.max_grad_norm)
    ds.pop("train_batch_size", None)
    ds["bf16"] = {"enabled": precision.name == "bf16"}
    ds["fp16"] = {"enabled": precision.name == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    opt = ds.get("optimizer", {}).get("params", {})
    fill(opt, "lr", t.learning_rate)
    fill(opt, "weight_decay", t.weight_decay)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def init_for_load(cfg: TrainerConfig, precision: Any) -> None:
    """Under ZeRO-3: make transformers' `from_pretrained` load into `zero.Init` (partitioned at
    load). Call before loading the model; the config stays alive for the rest of the process."""
    global _hf_ds_config
    if not is_zero3(cfg):
        return
    from transformers.integrations import HfDeepSpeedConfig

    _hf_ds_config = HfDeepSpeedConfig(config(cfg, precision))


def numel(p: Any) -> int:
    """A parameter's full size (a ZeRO-3 partitioned parameter is empty on each rank)."""
    return int(getattr(p, "ds_numel", 0) or p.numel())


def ndim(p: Any) -> int:
    shape = getattr(p, "ds_shape", None)
    return len(shape) if shape is not None else p.ndim


def initialize(
    model: Any, groups: list[dict], cfg: TrainerConfig, precision: Any, scheduler: Callable[[Any], Any], cuda: bool
) -> tuple[Any, Any, Any]:
    """(engine, optimizer, scheduler) from deepspeed.initialize over the preset."""
    deepspeed = require(cuda)
    engine, opt, _, sched = deepspeed.initialize(
        model=model, model_parameters=groups, config=config(cfg, precision), lr_scheduler=scheduler
    )
    return engine, opt, sched


def save_checkpoint(engine: Any, directory: Path) -> None:
    """This rank's shards (every rank calls it): trainable weights, optimizer and scheduler; frozen
    parameters excluded (the LoRA/QLoRA base is never checkpointed)."""
    engine.save_checkpoint(str(directory), tag=TAG, save_latest=False, exclude_frozen_parameters=True)


def load_checkpoint(engine: Any, directory: Path, uri: str) -> None:
    """Into the engine, in place. Frozen parameters are not in the checkpoint (loaded from the base)."""
    path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_module_strict=False)
    if path is None:
        raise UserError(f"checkpoint {uri}: DeepSpeed found no engine state under {directory.name}/")


def gathered_state_dict(cfg: TrainerConfig, parts: Any, rank0: bool) -> dict | None:
    """What export saves, on rank 0, under ZeRO-3 (every rank must call it): the consolidated
    16-bit model for full fine-tuning, the gathered trainable tensors for PEFT. None otherwise
    (ZeRO-2 and no DeepSpeed: the module on rank 0 is whole)."""
    if parts.ds_engine is None or not is_zero3(cfg):
        return None
    if cfg.method == "full":
        sd = parts.ds_engine._zero3_consolidated_16bit_state_dict()
        return dict(sd) if rank0 and sd is not None else None
    import deepspeed  # imported (and its accelerator chosen) by initialize

    model = parts.model
    params = [p for _, p in parts.trainable]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank0:
            names = {id(p): n for n, p in model.named_parameters()}
            return {names[id(p)]: p.detach().cpu().clone() for p in params}
    return None
