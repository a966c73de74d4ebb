"""The speed knobs of the TrainingSpec, each a spec field or an automatic choice (docs/design/trainer.md):

- gradientCheckpointing (`auto | always | never | offload`, + gradientCheckpointingEveryNLayers):
  through transformers 5.23's `activation_checkpointing_enable(every_n_layers, offload)`
  (non-reentrant). `auto` asks the estimator (kubetune_contract.estimate.resolve_checkpointing)
  with this GPU's total memory: never when the job fits without, else the fewest checkpointed
  layers that fit; on CPU never.
- liger (`auto | always | never`): Liger's kernels (RoPE, RMSNorm, SwiGLU, fused linear
  cross-entropy) patched into the architecture's transformers module before the model is loaded.
  liger-kernel is in the GPU image only; `auto` is a logged no-op without CUDA, without the
  package or for an architecture Liger has no kernels for; `always` makes each of those a user error.
- compile (`none | regional`): torch.compile on each decoder layer (in place, `nn.Module.compile`),
  the repeated block compiled once and reused, inside activation checkpointing.
- LoRA glue: under bf16/fp16 autocast the adapters' input is not copied to fp32 (peft's
  `cast_input_dtype_enabled`, what `peft.helpers.disable_input_dtype_casting` switches off):
  autocast runs the adapter matmuls in the compute dtype anyway, so the copy was pure memory traffic.
"""

from __future__ import annotations

import inspect
from typing import Any

from kubetune_contract.config import TrainerConfig

from . import logs
from .errors import UserError

# model_type values liger-kernel 0.8 patches (its MODEL_TYPE_TO_APPLY_LIGER_FN, when importable, wins)
LIGER_MODEL_TYPES = frozenset(
    {
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "glm4",
        "granite",
        "llama",
        "llava",
        "mistral",
        "mixtral",
        "mllama",
        "olmo2",
        "paligemma",
        "phi3",
        "qwen2",
        "qwen2_5_vl",
        "qwen2_vl",
        "qwen3",
        "qwen3_moe",
    }
)


# ---- gradient checkpointing -------------------------------------------------------------------


def resolve_checkpointing(
    cfg: TrainerConfig, model_config: dict, cuda: bool, capacity_gib: float | None, fused_ce: bool = False
) -> tuple[str, int]:
    """(mode, every n-th layer) this run uses: the spec's, or auto's choice."""
    from kubetune_contract import estimate as E

    t = cfg.training
    if t.gradient_checkpointing != "auto":
        return t.gradient_checkpointing, t.gradient_checkpointing_every_n_layers or 1
    if not cuda:
        return "never", 1
    try:
        arch = E.ModelArch.from_config(model_config)
    except E.EstimateError as e:
        logs.rank0("gradient_checkpointing_auto", "warning", choice="always", reason=f"no estimate: {e}")
        return "always", 1
    plan = E.Plan(
        cfg.method,
        t,
        cfg.lora,
        gpus_per_worker=max(1, cfg.gpus_per_worker),
        workers=cfg.workers,
        fused_cross_entropy=fused_ce,
    )
    resolved = E.resolve_checkpointing(arch, plan, capacity_gib)
    mode, every = E.checkpointing(resolved.training)
    gib = E.memory(arch, resolved).total / E.GIB
    logs.rank0(
        "gradient_checkpointing_auto",
        choice=mode,
        every_n_layers=every,
        estimate_gib=round(gib, 2),
        gpu_gib=capacity_gib,
    )
    return mode, every


def enable_checkpointing(model: Any, mode: str, every: int) -> None:
    """activation_checkpointing_enable on a transformers model (before peft wraps it)."""
    if mode == "never":
        return
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every, offload=mode == "offload"
    )


def checkpointed_layers(model: Any) -> list[bool]:
    """Per decoder layer, whether it recomputes in backward (what the tests and logs look at)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [bool(m.gradient_checkpointing) for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


# ---- Liger ------------------------------------------------------------------------------------


def _liger_table() -> dict[str, Any] | None:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # absent from CPU images (and any import failure means: no Liger)
        return None
    return dict(MODEL_TYPE_TO_APPLY_LIGER_FN)


def apply_liger(cfg: TrainerConfig, model_type: str | None, cuda: bool) -> bool:
    """Patch Liger's kernels into the architecture before loading; True when they are in use."""
    mode = cfg.training.liger
    if mode == "never":
        return False
    table = _liger_table()
    supported = set(table) if table is not None else set(LIGER_MODEL_TYPES)
    if model_type not in supported:
        if mode == "always":
            raise UserError(
                f"training.liger=always: Liger has no kernels for model_type {model_type!r} "
                f"(supported: {', '.join(sorted(supported))}); use training.liger auto or never"
            )
        logs.rank0("liger", enabled=False, reason=f"no Liger kernels for model_type {model_type!r}")
        return False
    if not cuda:
        if mode == "always":
            raise UserError(
                "training.liger=always needs a GPU (Liger's kernels are Triton, CUDA only); use auto or never"
            )
        logs.rank0("liger", enabled=False, reason="no CUDA device (training.liger=auto)")
        return False
    if table is None:
        if mode == "always":
            raise UserError(
                "training.liger=always needs liger-kernel, which this trainer image lacks; build it with "
                "EXTRAS=trainer,gpu,liger (Dockerfile.trainer), or set training.liger auto"
            )
        logs.rank0("liger", enabled=False, reason="liger-kernel is not installed (training.liger=auto)")
        return False
    fn = table[model_type]
    wanted = {
        "rope": True,
        "rms_norm": True,
        "swiglu": True,
        "cross_entropy": False,
        "fused_linear_cross_entropy": True,
    }
    params = inspect.signature(fn).parameters
    fn(**{k: v for k, v in wanted.items() if k in params})
    logs.rank0("liger", enabled=True, model_type=model_type, kernels=sorted(k for k in wanted if k in params))
    return True


# ---- regional compile, LoRA glue --------------------------------------------------------------


def compile_regions(model: Any, mode: str, backend: str = "inductor") -> int:
    """torch.compile every decoder layer in place (regional: one graph, reused per layer); the
    number of layers compiled."""
    if mode != "regional":
        return 0
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    logs.rank0("compile", mode=mode, layers=len(layers), backend=backend)
    return len(layers)


def no_adapter_input_copy(model: Any, autocast: bool) -> int:
    """Under autocast, stop peft casting each adapter's input to the adapter's fp32 dtype (the
    matmul runs in the compute dtype regardless); the number of adapted layers changed."""
    if not autocast:
        return 0
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = False
            n += 1
    return n
