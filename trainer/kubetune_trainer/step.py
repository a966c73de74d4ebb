"""One optimizer step's work: the micro-batches of a gradient-accumulation step, then the update.

The stop flag (SIGTERM) is read before every micro-batch; with several ranks they agree on it
through one one-element all-reduce, so all stop at the same micro-batch or none does. A stop drops
the partial step: its gradients are discarded and the RNG is put back to where the step began, so
the checkpoint written next is exactly the state after the last whole step and a resumed run
repeats the dropped step as if it had never started. Under DeepSpeed the partial accumulation lives
in the engine and is not part of its checkpoint.

No host sync per micro-batch: the loss is summed on the device and read once per step. (With
several ranks the stop agreement is a one-element all-reduce per micro-batch; on NCCL that is a
wait for the stream, the price of stopping between micro-batches.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from . import model as M
from .state import TrainingParts, set_rng_state


@dataclass
class MicroBatchTotals:
    loss_sum: float = 0.0  # sum over micro-batches of loss × n_items (this rank)
    tokens: int = 0
    samples: int = 0


def stop_agreed(stop: Any, dist: Any) -> bool:
    """True when any rank was told to stop (every rank gets the same answer)."""
    local = 1.0 if stop else 0.0
    if not dist.distributed:
        return local > 0
    return dist.all_reduce([local])[0] > 0


def accumulate(
    mbs: list, parts: TrainingParts, dist: Any, autocast: Any, n_items: float, pad_id: int, stop: Any
) -> MicroBatchTotals | None:
    """Forward and backward over the step's micro-batches; None when a stop came before one of
    them (the caller drops the step)."""
    model, engine, world = parts.wrapped, parts.ds_engine, dist.env.world
    out = MicroBatchTotals()
    loss_sum: Any = 0.0  # a device tensor after the first micro-batch: read once, after the last
    for i, seqs in enumerate(mbs):
        if stop_agreed(stop, dist):
            return None
        last = i == len(mbs) - 1
        sync = contextlib.nullcontext()
        if dist.distributed and engine is None and not last:
            sync = model.no_sync()
        with sync:
            with autocast:
                loss = M.forward(model, seqs, n_items, dist.device, pad_id).loss.float()
            loss_sum = loss_sum + loss.detach() * n_items  # no host sync per micro-batch
            scaled = loss * world  # DDP/DeepSpeed average gradients over ranks
            if engine is not None:
                engine.set_gradient_accumulation_boundary(last)
                engine.backward(scaled, scale_wrt_gas=False)
                engine.step()
            elif parts.scaler is not None:
                parts.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        out.tokens += sum(len(s) for s in seqs)
        out.samples += len(seqs)
    out.loss_sum = float(loss_sum)  # the step's one device→host read (its all-reduce needs it anyway)
    return out


def optimizer_step(parts: TrainingParts, max_grad_norm: float) -> None:
    """Unscale, clip, step, schedule, zero (without DeepSpeed: its engine.step did all of it)."""
    import torch

    if parts.scaler is not None:
        parts.scaler.unscale_(parts.optimizer)
    if max_grad_norm and max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for _, p in parts.trainable], max_grad_norm)
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)


def drop_partial_step(parts: TrainingParts, rng: dict, cuda: bool) -> None:
    """Forget a step begun but not finished: its gradients and the RNG draws it made."""
    if parts.ds_engine is None:
        parts.optimizer.zero_grad(set_to_none=True)
    set_rng_state(rng, cuda)
