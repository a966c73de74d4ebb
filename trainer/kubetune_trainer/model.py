"""Model side: where the base model comes from, precision, LoRA / QLoRA / full, DeepSpeed presets.

- Source: a local directory (pvc:// arrives as one, see config.local_path_for_uri), an s3:// prefix
  (downloaded to local disk first, by the caller through kubetune_trainer.s3), or a hub id.
- Precision "auto": bf16 when CUDA supports it, else fp32. fp16 and QLoRA need a GPU.
- LoRA keeps the base weights frozen (in the compute dtype) and trains fp32 adapters.
- QLoRA: bitsandbytes 4-bit nf4 with double quantisation and bf16 compute; bitsandbytes is
  imported only here, only when asked for (it is absent from CPU images).
- DeepSpeed (presets, zero.Init, engine checkpoints, ZeRO-3 export) lives in `zero`.
- The training parts (optimizer, schedule, scaler, DDP wrapper or DeepSpeed engine) are built here
  too: `build_training_parts` returns the `state.TrainingParts` that checkpoints save and restore.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kubetune_contract.config import TrainerConfig

from . import zero
from .dist import Dist, export_deepspeed_env
from .errors import UserError
from .state import TrainingParts


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32
    dtype: Any  # torch dtype for autocast / frozen weights
    autocast: bool

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16"


def resolve_precision(requested: str, cuda: bool) -> Precision:
    import torch

    name = requested
    if requested == "auto":
        name = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and not cuda:
        raise UserError("training.precision=fp16 needs a GPU; use fp32 or bf16 (or auto) on CPU")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("training.precision=bf16 is not supported by this GPU; use fp16 or auto")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    return Precision(name, dtype, name != "fp32")


def check_method_supported(cfg: TrainerConfig, cuda: bool) -> None:
    """Fail fast (exit 2) on combinations this machine cannot run."""
    if cfg.method == "qlora" and not cuda:
        raise UserError(
            "method=qlora needs a GPU (bitsandbytes 4-bit quantisation); this trainer "
            "has no CUDA device: use method=lora, or request GPUs (gpusPerWorker)"
        )


def load_tokenizer(src: str, cfg: TrainerConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            src, revision=cfg.base_model.revision, trust_remote_code=cfg.base_model.trust_remote_code
        )
    except OSError as e:
        raise UserError(f"baseModel.uri: cannot load a tokenizer from {cfg.base_model.uri}: {e}") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"baseModel.uri: the tokenizer of {cfg.base_model.uri} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _lora_targets(targets: list[str]):
    if len(targets) == 1 and targets[0].lower() == "all-linear":
        return "all-linear"
    return list(targets)


def _attention(cfg: TrainerConfig) -> str:
    """The attn_implementation: padding-free varlen (kubetune_trainer.attention) unless the spec
    asks for the flash-attn package."""
    if cfg.training.attention == "flash_attention_2":
        return "flash_attention_2"
    from .attention import register

    return register()


def load_model(src: str, cfg: TrainerConfig, precision: Precision, device):
    """The base model (frozen for lora/qlora, wrapped by peft) on `device`, ready to train, with the
    speed knobs of kubetune_trainer.speed applied (Liger, checkpointing, LoRA glue, compile)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import speed

    t = cfg.training
    kwargs: dict[str, Any] = dict(revision=cfg.base_model.revision, trust_remote_code=cfg.base_model.trust_remote_code)
    kwargs["attn_implementation"] = _attention(cfg)
    cuda = device.type == "cuda"
    try:
        base = AutoConfig.from_pretrained(
            src, revision=cfg.base_model.revision, trust_remote_code=cfg.base_model.trust_remote_code
        )
        model_type = getattr(base, "model_type", None)
    except (OSError, ValueError) as e:
        raise UserError(f"baseModel.uri: cannot load a model config from {cfg.base_model.uri}: {e}") from None
    liger = speed.apply_liger(cfg, model_type, cuda)  # patches the modeling module: before from_pretrained
    if cfg.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401  (imported only for qlora; absent on CPU images)
        except Exception as e:
            raise UserError(
                f"method=qlora needs bitsandbytes, which this trainer image lacks ({e}); "
                "build it with EXTRAS=trainer,gpu,qlora (Dockerfile.trainer)"
            ) from None
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision.name in ("bf16", "fp32") else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute,
        )
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": device.index or 0}
    elif cfg.method == "lora":
        # Frozen base weights in the compute dtype (halves memory under bf16); adapters stay fp32.
        kwargs["dtype"] = precision.dtype
    else:
        kwargs["dtype"] = torch.float32  # full fine-tuning: fp32 master weights, autocast computes
    zero.init_for_load(cfg, precision)  # ZeRO-3: from_pretrained partitions under zero.Init
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except ImportError as e:  # flash_attention_2 without the flash-attn package
        raise UserError(f"training.attention={t.attention}: {e}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"baseModel.uri: cannot load a causal LM from {cfg.base_model.uri}: {e}") from None
    model.config.use_cache = False
    if cfg.method != "qlora" and not zero.is_zero3(cfg):
        model.to(device)

    capacity = torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None
    mode, every = speed.resolve_checkpointing(cfg, model.config.to_dict(), cuda, capacity, fused_ce=liger)
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    speed.enable_checkpointing(model, mode, every)
    model.kubetune_checkpointing = (mode, every)  # for the model_loaded log line

    if cfg.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lc = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=_lora_targets(cfg.lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lc)
        except ValueError as e:
            raise UserError(f"lora.targetModules: {e}") from None
        if mode != "never":
            model.enable_input_require_grads()
        speed.no_adapter_input_copy(model, precision.autocast)
    speed.compile_regions(model, t.compile)
    return model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, counted the way peft counts them."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return tuple(model.get_nb_trainable_parameters())
    total = sum(zero.numel(p) for p in model.parameters())
    return sum(zero.numel(p) for p in model.parameters() if p.requires_grad), total


def unwrap(model):
    """The model under DDP / DeepSpeed wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def is_peft(model) -> bool:
    try:
        from peft import PeftModel

        return isinstance(unwrap(model), PeftModel)
    except Exception:
        return False


def cuda_available(force_cpu: bool = False) -> bool:
    """CUDA is used when present, unless the options say force_cpu (KUBETUNE_FORCE_CPU)."""
    import torch

    if force_cpu:
        return False
    return torch.cuda.is_available()


def build_training_parts(
    model, cfg: TrainerConfig, precision: Precision, total_steps: int, dist: Dist
) -> TrainingParts:
    """AdamW (weight decay on matrices only) and the LR schedule over total_steps, wrapped for
    DDP; or, with a DeepSpeed preset, the engine built by deepspeed.initialize around the same
    schedule (its optimizer comes from the preset: torch AdamW, see `zero`)."""
    import torch
    from transformers import get_scheduler

    t = cfg.training
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if zero.ndim(p) >= 2]
    no_decay = [p for n, p in params if zero.ndim(p) < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    warmup = math.ceil(t.warmup_ratio * total_steps)
    if zero.enabled(cfg):
        export_deepspeed_env(dist.env)
        engine, opt, sched = zero.initialize(
            model,
            groups,
            cfg,
            precision,
            lambda o: get_scheduler(t.lr_scheduler, o, num_warmup_steps=warmup, num_training_steps=total_steps),
            dist.cuda,
        )
        return TrainingParts(
            model=model, wrapped=engine, trainable=params, optimizer=opt, scheduler=sched, ds_engine=engine
        )
    optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, fused=dist.cuda)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
    wrapped = model
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[dist.device.index] if dist.cuda else None)
    return TrainingParts(
        model=model, wrapped=wrapped, trainable=params, optimizer=optimizer, scheduler=scheduler, scaler=scaler
    )


def autocast(precision: Precision, device: Any, parts: TrainingParts) -> Any:
    """The autocast context of forward passes (DeepSpeed casts by itself)."""
    import contextlib

    import torch

    if precision.autocast and parts.ds_engine is None:
        return torch.autocast(device.type, dtype=precision.dtype)
    return contextlib.nullcontext()


def forward(model: Any, seqs: list, n_items: float, device: Any, pad_id: int | None = None) -> Any:
    """One forward pass over seqs, padding-free (data.collate: one flattened row with the example
    boundaries); its loss is the sum over their trained tokens / n_items. pad_id is unused (no
    padding) and kept for callers."""
    from .data import collate

    batch = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in collate(seqs).items()}
    return model(**batch, num_items_in_batch=n_items, use_cache=False)


def eval_loss(
    parts: TrainingParts, seqs: list, *, dist: Dist, batch_size: int, precision: Precision, pad_id: int
) -> float | None:
    """Token-weighted loss over seqs, each rank taking its share; the same value on every rank."""
    import torch

    parts.wrapped.eval()
    mine = seqs[dist.env.rank :: dist.env.world]
    total = count = 0.0
    ctx = autocast(precision, dist.device, parts)
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            batch = mine[i : i + batch_size]
            n = sum(s.trained_tokens for s in batch)
            if n == 0:
                continue
            with ctx:
                out = forward(parts.model, batch, float(n), dist.device, pad_id)
            total += float(out.loss.float()) * n
            count += n
    total, count = dist.all_reduce([total, count])
    return total / count if count else None
