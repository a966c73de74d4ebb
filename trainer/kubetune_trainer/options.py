"""Every knob of a trainer process, read from its environment once, in the entry point.

`TrainerOptions.from_environ(os.environ)` is called by `__main__` (and, for in-process callers
such as tests, by `train.run(cfg, opts=None)`); everything below it gets the options passed down.
No other trainer module reads the environment (logs.py only sets defaults for libraries; boto3
reads the AWS_* credentials itself). The names are the contract's (`kubetune_contract.envvars`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kubetune_contract import envvars
from kubetune_contract.layout import CONFIG_PATH, DEFAULT_WORK_DIR, METRICS_PORT, RENDEZVOUS_PORT, TERMINATION_LOG

from .dist import DistEnv
from .errors import UserError


@dataclass(frozen=True)
class TrainerOptions:
    config_path: str = CONFIG_PATH
    """The trainer config JSON (KUBETUNE_CONFIG); `--config` overrides it."""
    work_dir: Path = Path(DEFAULT_WORK_DIR)
    """Local scratch: base model, data, checkpoint staging, output (KUBETUNE_WORK_DIR)."""
    metrics_port: int | None = METRICS_PORT
    """/metrics and /progress (KUBETUNE_METRICS_PORT); None: no server ("off"); 0: any free port."""
    termination_log: str = TERMINATION_LOG
    """Where rank 0 writes the final ProgressRecord (KUBETUNE_TERMINATION_LOG)."""
    dist: DistEnv = field(default_factory=DistEnv)
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT."""
    attempt: int | None = None
    """The operator's 0-based attempt (KUBETUNE_ATTEMPT); None outside a pod (taken as 0). With the
    pod UID it is the attempt's token: the fence (`fence`) and the checkpoint directories use it."""
    pod_uid: str = ""
    """This pod's metadata.uid (KUBETUNE_POD_UID); empty outside a pod."""
    local_worker: bool = False
    """Started by the launcher for one GPU of a pod (KUBETUNE_LOCAL_WORKER): train, never launch."""
    procs_per_worker: int | None = None
    """Local processes per pod (KUBETUNE_PROCS_PER_WORKER); None: one per GPU. CPU tests only."""
    force_cpu: bool = False
    """Ignore CUDA even when present (KUBETUNE_FORCE_CPU=1)."""
    dist_timeout_seconds: float = 1800.0
    """torch.distributed rendezvous and collective timeout (KUBETUNE_DIST_TIMEOUT_SECONDS)."""
    shutdown_upload_timeout_seconds: float = 600.0
    """How long exit waits for a checkpoint upload in flight (KUBETUNE_SHUTDOWN_UPLOAD_TIMEOUT)."""
    peak_flops: float | None = None
    """Dense bf16/fp16 peak FLOP/s of one GPU, for MFU (KUBETUNE_PEAK_FLOPS); None: looked up by the
    GPU's name (mfu.PEAK_FLOPS); MFU is absent when neither knows."""
    job_cost: str | None = None
    """The earlier attempts' goodput and cost (KUBETUNE_JOB_COST, JSON: kubetune_contract.jobcost),
    for the model card; parsed there (a malformed value only leaves the card without them)."""
    step_delay_seconds: float = 0.0
    """Test/demo only (KUBETUNE_STEP_DELAY_SECONDS): sleep after each optimizer step so a
    preemption can be injected mid-run. Reachable from a pod's env (spec.pod.env), never set by
    the operator; applied as a step hook (train.run)."""

    @property
    def token(self) -> tuple[int | None, str]:
        """(attempt, pod UID): what every write of this attempt carries."""
        return self.attempt, self.pod_uid

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TrainerOptions:
        """Parse the environment; a malformed value is a UserError naming the variable."""
        port_env = environ.get(envvars.METRICS_PORT)
        port: int | None = METRICS_PORT
        if port_env is not None:
            port = None if port_env in ("", "off", "-1") else _int(environ, envvars.METRICS_PORT, METRICS_PORT)
        world = _int(environ, envvars.WORLD_SIZE, 1)
        rank = _int(environ, envvars.RANK, 0)
        if world < 1 or not 0 <= rank < world:
            raise UserError(f"environment {envvars.RANK}={rank} / {envvars.WORLD_SIZE}={world} are inconsistent")
        dist = DistEnv(
            rank=rank,
            world=world,
            local_rank=_int(environ, envvars.LOCAL_RANK, 0),
            master_addr=environ.get(envvars.MASTER_ADDR) or "127.0.0.1",
            master_port=_int(environ, envvars.MASTER_PORT, RENDEZVOUS_PORT),
        )
        procs = environ.get(envvars.PROCS_PER_WORKER)
        return cls(
            config_path=environ.get(envvars.CONFIG, CONFIG_PATH),
            work_dir=Path(environ.get(envvars.WORK_DIR, DEFAULT_WORK_DIR)),
            metrics_port=port,
            termination_log=environ.get(envvars.TERMINATION_LOG, TERMINATION_LOG),
            dist=dist,
            attempt=_int_or_none(environ.get(envvars.ATTEMPT, "")),
            pod_uid=environ.get(envvars.POD_UID, ""),
            local_worker=bool(environ.get(envvars.LOCAL_WORKER)),
            procs_per_worker=max(1, _int(environ, envvars.PROCS_PER_WORKER, 1)) if procs else None,
            force_cpu=environ.get(envvars.FORCE_CPU) == "1",
            dist_timeout_seconds=_float(environ, envvars.DIST_TIMEOUT_SECONDS, 1800.0),
            shutdown_upload_timeout_seconds=_float(environ, envvars.SHUTDOWN_UPLOAD_TIMEOUT, 600.0),
            step_delay_seconds=_float(environ, envvars.STEP_DELAY_SECONDS, 0.0),
            peak_flops=_float(environ, envvars.PEAK_FLOPS, 0.0) or None,
            job_cost=environ.get(envvars.JOB_COST) or None,
        )


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    v = environ.get(name)
    if v in (None, ""):
        return default
    try:
        return int(v)
    except ValueError:
        raise UserError(f"environment {name}={v!r} is not an integer") from None


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    v = environ.get(name)
    if v in (None, ""):
        return default
    try:
        return float(v)
    except ValueError:
        raise UserError(f"environment {name}={v!r} is not a number") from None


def _int_or_none(v: str) -> int | None:
    # a bad attempt number is dropped (taken as 0, like outside a pod)
    try:
        return int(v)
    except ValueError:
        return None
