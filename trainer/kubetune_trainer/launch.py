"""Several GPUs in one pod: the container's process becomes a small launcher that starts one
training process per GPU (like torchrun), forwards SIGTERM to them, and exits with one code.

The operator sets RANK/WORLD_SIZE to the pod's index and the number of pods. With
gpusPerWorker = g > 1 the launcher gives local process i: RANK = pod*g + i, WORLD_SIZE = pods*g,
LOCAL_RANK = i (MASTER_ADDR/PORT unchanged: global rank 0 hosts the rendezvous).
KUBETUNE_PROCS_PER_WORKER (options.procs_per_worker) overrides g (used by tests on CPU).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Mapping

from kubetune_contract import envvars
from kubetune_contract.config import TrainerConfig
from kubetune_contract.progress import ExitCode

from . import logs
from .options import TrainerOptions


def procs_per_worker(cfg: TrainerConfig, opts: TrainerOptions) -> int:
    if opts.procs_per_worker is not None:
        return opts.procs_per_worker
    if cfg.gpus_per_worker <= 1:
        return 1
    from .model import cuda_available

    if not cuda_available(opts.force_cpu):
        return 1
    import torch

    return max(1, min(cfg.gpus_per_worker, torch.cuda.device_count()))


def combine(codes: list[int]) -> ExitCode:
    """One exit code for the pod: a user error wins, then failures, then preemption."""
    if any(c == ExitCode.USER_ERROR for c in codes):
        return ExitCode.USER_ERROR
    if any(c not in (ExitCode.SUCCESS, ExitCode.PREEMPTED) for c in codes):
        return ExitCode.RETRIABLE
    if any(c == ExitCode.PREEMPTED for c in codes):
        return ExitCode.PREEMPTED
    return ExitCode.SUCCESS


def maybe_launch_local_workers(cfg: TrainerConfig, opts: TrainerOptions, environ: Mapping[str, str]) -> ExitCode | None:
    """None when this process should train itself; else the combined exit code of its workers.
    Each worker gets a copy of environ (this process's environment) with its own ranks."""
    if opts.local_worker:
        return None
    g = procs_per_worker(cfg, opts)
    if g <= 1:
        return None
    pod_rank, pods = opts.dist.rank, opts.dist.world
    children: list[subprocess.Popen] = []
    for i in range(g):
        env = dict(environ)
        env.update(
            {
                envvars.LOCAL_WORKER: "1",
                envvars.RANK: str(pod_rank * g + i),
                envvars.WORLD_SIZE: str(pods * g),
                envvars.LOCAL_RANK: str(i),
                envvars.LOCAL_WORLD_SIZE: str(g),
            }
        )
        children.append(subprocess.Popen([sys.executable, "-m", "kubetune_trainer", *sys.argv[1:]], env=env))
    logs.log("local_workers_started", workers=g, pids=[c.pid for c in children])

    def forward(signum, _frame):
        for c in children:
            if c.poll() is None:
                try:
                    c.send_signal(signum)
                except OSError:
                    pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed_at = None
    while any(c.poll() is None for c in children):
        bad = [c for c in children if c.poll() not in (None, 0, ExitCode.PREEMPTED)]
        if bad and failed_at is None:
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 60:
            for c in children:  # peers stuck in a collective with a dead worker
                if c.poll() is None:
                    c.kill()
        time.sleep(0.5)
    codes = [c.returncode for c in children]
    code = combine(codes)
    logs.log("local_workers_exited", codes=codes, exit_code=int(code))
    return code
