"""Distributed set-up: this process's place in the job, torch.distributed start and teardown, and
the few collectives the trainer uses (every rank must call each of them, in the same order).

`RANK`/`WORLD_SIZE` are the pod's index and the number of pods (or, under the launcher, the
process's global rank and the number of processes); `MASTER_ADDR`/`MASTER_PORT` the rendezvous
(`tcp://`, hosted by global rank 0). gloo on CPU, nccl on GPU. Everything here is a no-op for a
single process, so the training code never branches on "am I distributed".
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetune_contract import envvars
from kubetune_contract.layout import RENDEZVOUS_PORT

from . import logs
from .errors import RetriableError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (read from the environment by `options`)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = RENDEZVOUS_PORT


class Dist:
    """This process's rank, its device, and the collectives over all ranks."""

    def __init__(self, env: DistEnv, device: Any = None, cuda: bool = False) -> None:
        self.env = env
        self.device = device
        self.cuda = cuda

    @property
    def rank0(self) -> bool:
        return self.env.rank == 0

    @property
    def distributed(self) -> bool:
        return self.env.world > 1

    def all_reduce(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (float64)."""
        if not self.distributed:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.cuda else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, ok: bool) -> bool:
        """True when every rank says ok."""
        return self.all_reduce([0.0 if ok else 1.0])[0] == 0.0

    def gather_objects(self, obj: Any) -> list:
        """Every rank's obj, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.env.world
        dist.all_gather_object(out, obj)
        return out

    def together(self, fn: Callable[[], Any] | None, what: str) -> None:
        """Run fn (or nothing) on this rank; every rank learns whether all succeeded, so one
        rank's failure does not leave the others blocked in the next collective."""
        err: BaseException | None = None
        if fn is not None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                err = e
        ok = self.agree(err is None)
        if err is not None:
            raise err
        if not ok:
            raise RetriableError(f"another rank failed while {what}")


def start(env: DistEnv, *, cuda: bool, timeout_seconds: float, deepspeed: bool) -> Dist:
    """Pick this rank's device and join the process group (when there is more than one rank, or
    DeepSpeed wants one)."""
    import torch

    if cuda:
        torch.cuda.set_device(env.local_rank % max(1, torch.cuda.device_count()))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if env.world > 1 or deepspeed:
        import torch.distributed as dist

        backend = "nccl" if cuda else "gloo"
        logs.log(
            "distributed_init",
            backend=backend,
            rank=env.rank,
            world=env.world,
            master=f"{env.master_addr}:{env.master_port}",
        )
        try:
            dist.init_process_group(
                backend,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world,
                timeout=_dt.timedelta(seconds=timeout_seconds),
            )
        except Exception as e:
            raise RetriableError(
                f"torch.distributed rendezvous at {env.master_addr}:{env.master_port} failed: {e}"
            ) from e
    return Dist(env, device, cuda)


def teardown() -> None:
    """Leave the process group if one was joined (matters when training runs in-process)."""
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def export_deepspeed_env(env: DistEnv) -> None:
    """deepspeed.initialize reads the torch.distributed variables from the environment: write ours
    there (a write for the library, not a knob the trainer reads back)."""
    os.environ.setdefault(envvars.RANK, str(env.rank))
    os.environ.setdefault(envvars.WORLD_SIZE, str(env.world))
    os.environ.setdefault(envvars.LOCAL_RANK, str(env.local_rank))
    os.environ.setdefault(envvars.MASTER_ADDR, env.master_addr)
    os.environ.setdefault(envvars.MASTER_PORT, str(env.master_port))
