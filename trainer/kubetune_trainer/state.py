"""The training-state format: what one checkpoint directory holds and how it is written and read.

Functions over explicit training parts (model weights, optimizer, scheduler, scaler or the
DeepSpeed engine), the per-rank RNG states and the `TrainState` (step and data position), never
over the run. *Where* a checkpoint goes (S3, manifest last, pruning) is `checkpoint.CheckpointStore`;
*when* and *by whom* it is taken is `train`.

A directory of format 1:
- `trainable.safetensors`: every trainable tensor by name (the LoRA adapters, or all weights for
  full fine-tuning); `optimizer.pt`, `scheduler.pt`, `scaler.pt` (fp16 only) — or, under
  DeepSpeed, the engine's own `deepspeed/` directory instead of these four: every rank's ZeRO
  shards (`deepspeed/state/zero_pp_rank_<r>_*`, frozen parameters excluded), each rank writing
  and uploading its own (`zero`, `shards`);
- `rng.pt`: a list, one entry per rank: python, numpy, torch CPU (and CUDA) generator states;
- `trainer_state.json`: `TrainState` (step, data position, counters, wall time, GPU-seconds).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import logs, zero
from .dist import Dist
from .errors import UserError

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng.pt"
DEEPSPEED_DIR = "deepspeed"


@dataclass
class TrainState:
    """Where training stands: restored on resume, so a resumed run continues exactly."""

    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of the current epoch consumed (global micro-batches)
    sequences_in_epoch: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    elapsed_seconds: float = 0.0  # wall time of all attempts up to this state
    gpu_seconds: float = 0.0
    last_loss: float | None = None
    last_eval_loss: float | None = None
    world_size: int = 1
    global_micro_batch: int = 1
    total_steps: int = 0
    dataset_sha256: str = ""
    highest_step: int = 0  # the highest global step any attempt reached, as known at this state
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainingParts:
    """What an optimizer step changes, built by `model.build_training_parts`."""

    model: Any  # the (peft-wrapped) model
    wrapped: Any  # what forward/backward go through: the model, its DDP wrapper, or the DeepSpeed engine
    trainable: list[tuple[str, Any]]  # (name, parameter) of every parameter that requires grad
    optimizer: Any
    scheduler: Any
    scaler: Any = None  # torch.amp.GradScaler under fp16
    ds_engine: Any = None  # the DeepSpeed engine; it then owns weights, optimizer and scheduler


# ------------------------------------------------------------------------------------------
# RNG


def rng_state(cuda: bool) -> dict:
    """This process's generator states (python, numpy, torch CPU, and CUDA when used)."""
    import numpy as np
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if cuda:
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict, cuda: bool) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if cuda and "cuda" in st:
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------
# save


def write(local: Path, parts: TrainingParts, state: TrainState, dist: Dist) -> bool:
    """Write this rank's share of a checkpoint of this step into local (a directory of its own).
    Every rank calls it (the RNG states are gathered; under DeepSpeed every rank writes its own
    shards); rank 0 writes the rest. True when this rank has files to upload: rank 0, and under
    DeepSpeed every rank."""
    rngs = dist.gather_objects(rng_state(dist.cuda))
    ds = parts.ds_engine is not None
    if dist.rank0 or ds:
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
    if ds:
        zero.save_checkpoint(parts.ds_engine, local / DEEPSPEED_DIR)
    if not dist.rank0:
        return ds
    save(local, parts, state, rngs)
    return True


def save(local: Path, parts: TrainingParts, state: TrainState, rngs: list[dict]) -> None:
    """Write the rest of the checkpoint into local (rank 0): weights, optimizer, scheduler and
    scaler (unless the DeepSpeed engine wrote them), every rank's RNG, the state file."""
    import torch

    if parts.ds_engine is None:
        from safetensors.torch import save_file

        save_file({n: p.detach().to("cpu").contiguous() for n, p in parts.trainable}, str(local / WEIGHTS_FILE))
        torch.save(parts.optimizer.state_dict(), local / OPTIMIZER_FILE)
        torch.save(parts.scheduler.state_dict(), local / SCHEDULER_FILE)
        if parts.scaler is not None:
            torch.save(parts.scaler.state_dict(), local / SCALER_FILE)
    torch.save(rngs, local / RNG_FILE)
    (local / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))


# ------------------------------------------------------------------------------------------
# load


def restore(
    ckpt_dir: Path, uri: str, parts: TrainingParts, dist: Dist, *, global_micro: int, micro_per_epoch: int, seed: int
) -> TrainState:
    """Load a downloaded checkpoint into parts and this rank's RNG; the returned state's data
    position fits this run's batches."""
    st = read_state(ckpt_dir, uri)
    load_parts(ckpt_dir, parts, dist.device, uri)
    env = dist.env
    restore_rng(ckpt_dir, st, rank=env.rank, world=env.world, cuda=dist.cuda, seed=seed)
    old_world = st.world_size
    if reposition(st, global_micro=global_micro, micro_per_epoch=micro_per_epoch, world=env.world):
        logs.rank0("resume_world_size_changed", "warning", old=old_world, new=env.world)
    return st


def read_state(ckpt_dir: Path, uri: str) -> TrainState:
    st = TrainState.from_dict(json.loads((ckpt_dir / STATE_FILE).read_text()))
    if st.format_version != FORMAT_VERSION:
        raise UserError(f"checkpoint {uri} has format {st.format_version}, this trainer reads {FORMAT_VERSION}")
    return st


def load_parts(ckpt_dir: Path, parts: TrainingParts, device: Any, uri: str) -> None:
    """Weights, optimizer, scheduler and scaler (or the DeepSpeed engine) from ckpt_dir, in place."""
    import torch

    if parts.ds_engine is not None:
        zero.load_checkpoint(parts.ds_engine, ckpt_dir / DEEPSPEED_DIR, uri)
        return
    from safetensors.torch import load_file

    weights = load_file(str(ckpt_dir / WEIGHTS_FILE))
    by_name = dict(parts.trainable)
    missing = set(by_name) - set(weights)
    if missing:
        raise UserError(
            f"checkpoint {uri} does not match the model (method or lora settings "
            f"changed?): missing {sorted(missing)[:5]}"
        )
    shapes = [
        f"{n}: {tuple(weights[n].shape)} vs {tuple(p.shape)}" for n, p in by_name.items() if weights[n].shape != p.shape
    ]
    if shapes:
        raise UserError(
            f"checkpoint {uri} does not match the model (lora.r or the method changed?): "
            f"checkpoint vs model shapes {shapes[:3]}"
        )
    with torch.no_grad():
        for n, p in by_name.items():
            p.copy_(weights[n].to(p.device, p.dtype))
    parts.optimizer.load_state_dict(safe_load(ckpt_dir / OPTIMIZER_FILE, map_location=device))
    parts.scheduler.load_state_dict(safe_load(ckpt_dir / SCHEDULER_FILE))
    if parts.scaler is not None and (ckpt_dir / SCALER_FILE).exists():
        parts.scaler.load_state_dict(safe_load(ckpt_dir / SCALER_FILE))


def safe_load(path: Path, map_location: Any = None) -> Any:
    """torch.load with weights_only=True: tensors, containers and numbers only, plus the three numpy
    globals a numpy RNG state needs. Whoever can write the checkpoint prefix must not run code in
    the next attempt (a pickle's other globals are refused: UnpicklingError, a user error)."""
    import numpy as np
    import torch
    from numpy._core.multiarray import _reconstruct

    allowed = [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"checkpoint file {path.name} holds objects other than tensors and numbers: {e}") from e


def restore_rng(ckpt_dir: Path, st: TrainState, *, rank: int, world: int, cuda: bool, seed: int) -> None:
    """This rank's RNG as saved; with another world size fresh streams (documented, not exact)."""
    rngs = safe_load(ckpt_dir / RNG_FILE)
    if st.world_size == world and rank < len(rngs):
        set_rng_state(rngs[rank], cuda)
    else:
        seed_everything(seed + 1000 * st.global_step + rank)


def reposition(st: TrainState, *, global_micro: int, micro_per_epoch: int, world: int) -> bool:
    """Adapt the data position to this run's global micro-batch; True when it changed (another
    world size): the position is then kept in sequences, not micro-batches."""
    changed = st.global_micro_batch != global_micro
    if changed:
        st.micro_in_epoch = min(micro_per_epoch, st.sequences_in_epoch // global_micro)
    st.world_size = world
    st.global_micro_batch = global_micro
    return changed
