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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_contract.estimate import ModelShape, attention_flops_per_token, flops_per_token
from kubetune_contract.gpus import PEAK_FLOPS, peak_flops_for

from . import logs

# The GPU peaks and the FLOPs formula live in the contract, so the operator's estimator counts the same FLOPs.
__all__ = [
    "PEAK_FLOPS",
    "ModelShape",
    "MfuMeter",
    "attention_flops_per_token",
    "flops_per_token",
    "meter_for",
    "mfu",
    "peak_flops_for",
    "shape_of",
]


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
