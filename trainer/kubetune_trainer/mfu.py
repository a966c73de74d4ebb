"""Model FLOPs utilization: pure functions over the model's shape and the GPU's peak.

    FLOPs per token (full fine-tuning)  = 6·N_total + 12·L·H·S
    FLOPs per token (LoRA, QLoRA)       = 4·N_frozen + 6·N_trainable + 12·L·H·S
    MFU = tokens/s (all ranks) × FLOPs per token ÷ (peak FLOP/s per GPU × GPUs)

6·N: every weight costs 2 FLOPs per token forward and 4 backward (the gradient with respect to
the activations and the one with respect to the weight), PaLM (Chowdhery et al. 2022) appendix
B. A frozen weight (the LoRA base) needs no weight gradient, only the activation gradient that
flows through it to the adapters: 2 forward + 2 backward = 4·N_frozen. The attention term is
PaLM's 12·L·H·Q·T with H·Q = the hidden size and T the sequence length (the score and value
matmuls, which have no weights: forward 4·L·H·S, backward 8·L·H·S, the same with or without
LoRA). These are *model* FLOPs: the recompute of gradient checkpointing is not useful work and
is not counted (hardware FLOPs would count it), so MFU is comparable across that setting.

N counts every parameter, the input embedding table included (as PaLM and nanoGPT do); on a
small model with a big vocabulary that overstates the work slightly.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import logs

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU, from the vendors' datasheets.
# First match wins: the more specific names come first. Override: KUBETUNE_PEAK_FLOPS.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    (r"H200", 989e12),
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100", 989e12),  # SXM (HBM3)
    (r"GH200", 989e12),
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"L4\b", 121e12),
    # AWS's A10 variant (g5): NVIDIA publishes no sheet for it; the figure AWS partners quote is
    # 70 TFLOPS bf16 dense, below the A10's tensor peak (its FP32 is higher).
    (r"A10G", 70e12),
    (r"A10\b", 125e12),
    (r"T4\b", 65e12),  # fp16 only (no bf16)
    (r"V100", 125e12),
)


def peak_flops_for(gpu_name: str | None) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of one GPU by its product name (`torch.cuda.get_device_name`,
    NVML's name: "NVIDIA H100 80GB HBM3"); None when the name is unknown (MFU is then absent)."""
    if not gpu_name:
        return None
    for pattern, peak in PEAK_FLOPS:
        if re.search(pattern, gpu_name, flags=re.I):
            return peak
    return None


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    trainable_params: int
    layers: int
    hidden_size: int
    seq_len: float  # mean trained sequence length (tokens)

    @property
    def frozen_params(self) -> int:
        return max(0, self.total_params - self.trainable_params)


def attention_flops_per_token(layers: int, hidden_size: int, seq_len: float) -> float:
    return 12.0 * layers * hidden_size * seq_len


def flops_per_token(shape: ModelShape, method: str) -> float:
    """Model FLOPs to train on one token (forward + backward), see the module docstring."""
    attn = attention_flops_per_token(shape.layers, shape.hidden_size, shape.seq_len)
    if method == "full":
        return 6.0 * shape.total_params + attn
    return 4.0 * shape.frozen_params + 6.0 * shape.trainable_params + attn


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_per_gpu: float | None, gpus: int) -> float | None:
    """Model FLOPs utilization (0-1 on a sane run); None without a known peak or GPUs."""
    if not peak_flops_per_gpu or peak_flops_per_gpu <= 0 or gpus < 1:
        return None
    return tokens_per_second * flops_per_token / (peak_flops_per_gpu * gpus)


def shape_of(model: object, trainable: int, total: int, seq_len: float) -> ModelShape | None:
    """The shape of a Hugging Face causal LM (its config's layers and hidden size); None when the
    config does not say."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not isinstance(layers, int) or not isinstance(hidden, int):
        return None
    return ModelShape(total, trainable, layers, hidden, seq_len)


@dataclass(frozen=True)
class MfuMeter:
    """MFU's inputs for one run: the model's FLOPs per token, the GPU's peak and the GPUs training."""

    flops_per_token: float
    peak_flops_per_gpu: float | None
    gpus: int

    def ratio(self, tokens_per_second: float) -> float | None:
        return mfu(tokens_per_second, self.flops_per_token, self.peak_flops_per_gpu, self.gpus)


def meter_for(
    model: Any, trainable: int, total: int, seqs: Sequence[Any], method: str, dist: Any, opts: Any
) -> MfuMeter | None:
    """The meter for this model on this data (mean trained sequence length) and this GPU; None when the model's
    config has no shape. Without CUDA the peak is unknown and the ratio is None (MFU absent on CPU)."""
    shape = shape_of(model, trainable, total, sum(len(s) for s in seqs) / max(1, len(seqs)))
    if shape is None:
        return None
    gpu, peak = None, None
    if dist.cuda:
        import torch

        with contextlib.suppress(Exception):
            gpu = torch.cuda.get_device_name(dist.device)
        peak = opts.peak_flops or peak_flops_for(gpu)
    fpt = flops_per_token(shape, method)
    logs.rank0("model_flops", flops_per_token=fpt, gpu=gpu, peak_flops=peak, seq_len=round(shape.seq_len, 1))
    return MfuMeter(fpt, peak, dist.env.world)
