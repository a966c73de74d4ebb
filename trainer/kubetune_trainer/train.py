"""The training run: preflight → load → (resume) → train loop with checkpoints → export.

A lean custom loop (see docs/design/trainer.md for why not transformers.Trainer):
- one optimizer step = `gradient_accumulation_steps` micro-batches (fewer at an epoch's end);
  the loss is token-weighted over the whole step and all ranks (sum of token losses / number of
  trained tokens), so gradient accumulation and data parallelism do not change the objective;
- after every step one small all-reduce carries [loss sum, tokens, sequences, SIGTERM seen,
  checkpoint due by time]: every rank learns at the same step that one of them was told to stop,
  and rank 0's clock alone decides time-based checkpoints, so all ranks agree on when to save;
- a checkpoint blocks training only for the local save; CheckpointStore uploads in the
  background (rank 0 only) and commits the manifest last. On SIGTERM the run finishes the current
  step, saves, waits for the upload, and exits with ExitCode.PREEMPTED.
- resume restores weights (trainable tensors), optimizer, scheduler, gradient scaler, every rank's
  RNG (python, numpy, torch, cuda) and the data position (epoch, micro-batch within the epoch), so
  an interrupted run continues with exactly the batches, dropout masks and updates of an
  uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import logs
from kubetune_contract import envvars
from kubetune_contract.config import TrainerConfig
from kubetune_contract.layout import METRICS_PORT, RENDEZVOUS_PORT, TERMINATION_LOG
from kubetune_contract.progress import ExitCode
from .errors import KubetuneError, RetriableError, UserError

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------
# options, environment, signals


@dataclass
class RunOptions:
    work_dir: Path = Path(os.environ.get("KUBETUNE_WORK_DIR", "/tmp/kubetune"))
    metrics_port: int | None = METRICS_PORT  # None: no HTTP server; 0: any free port
    termination_log: str = TERMINATION_LOG
    install_signal_handlers: bool = True

    @classmethod
    def from_environ(cls) -> "RunOptions":
        port_env = os.environ.get(envvars.METRICS_PORT)
        port: int | None = METRICS_PORT
        if port_env is not None:
            port = None if port_env in ("", "off", "-1") else int(port_env)
        return cls(
            work_dir=Path(os.environ.get("KUBETUNE_WORK_DIR", "/tmp/kubetune")),
            metrics_port=port,
            termination_log=os.environ.get("KUBETUNE_TERMINATION_LOG", TERMINATION_LOG),
        )


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = RENDEZVOUS_PORT

    @classmethod
    def from_environ(cls) -> "DistEnv":
        def num(name: str, default: int) -> int:
            v = os.environ.get(name)
            if v in (None, ""):
                return default
            try:
                return int(v)
            except ValueError:
                raise UserError(f"environment {name}={v!r} is not an integer") from None

        world = num(envvars.WORLD_SIZE, 1)
        rank = num(envvars.RANK, 0)
        if world < 1 or not 0 <= rank < world:
            raise UserError(f"environment {envvars.RANK}={rank} / {envvars.WORLD_SIZE}={world} are inconsistent")
        return cls(rank, world, num("LOCAL_RANK", 0), os.environ.get(envvars.MASTER_ADDR, "127.0.0.1"),
                   num(envvars.MASTER_PORT, RENDEZVOUS_PORT))


class StopFlag:
    """Set by SIGTERM/SIGINT; read at step boundaries."""

    def __init__(self):
        self._ev = threading.Event()
        self.signal: str | None = None

    def set(self, name: str = "manual") -> None:
        if not self._ev.is_set():
            self.signal = name
            self._ev.set()

    def __bool__(self) -> bool:
        return self._ev.is_set()

    def install(self) -> None:
        def handler(signum, _frame):
            first = not self._ev.is_set()
            self.set(signal.Signals(signum).name)
            if first:
                logs.log("signal_received", "warning", signal=signal.Signals(signum).name,
                         action="finish the current step, checkpoint, exit")

        self._previous = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, handler)

    def uninstall(self) -> None:
        """Give the previous handlers back (matters when run in-process, e.g. in tests)."""
        for s, h in getattr(self, "_previous", {}).items():
            with contextlib.suppress(Exception):
                signal.signal(s, h)
        self._previous = {}


class Preempted(Exception):
    """Stop requested before any training step of this attempt: nothing new to save."""


# ------------------------------------------------------------------------------------------
# training state


@dataclass
class TrainState:
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
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Throughput:
    t0: float = field(default_factory=time.monotonic)
    tokens: int = 0
    samples: int = 0
    steps: int = 0

    def reset(self) -> None:
        self.t0, self.tokens, self.samples, self.steps = time.monotonic(), 0, 0, 0

    def rates(self) -> tuple[float, float, float]:
        dt = max(1e-9, time.monotonic() - self.t0)
        return self.tokens / dt, self.samples / dt, self.steps / dt


# ------------------------------------------------------------------------------------------
# RNG


def rng_state(cuda: bool) -> dict:
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
# the run


class Run:
    def __init__(self, cfg: TrainerConfig, opts: RunOptions, dist_env: DistEnv | None = None,
                 stop: StopFlag | None = None):
        self.cfg = cfg
        self.opts = opts
        self.env = dist_env or DistEnv.from_environ()
        self.rank0 = self.env.rank == 0
        self.stop = stop or StopFlag()
        self.state = TrainState()
        self.resumed_from: int | None = None
        self.store = None
        self._client = None
        self.started = time.monotonic()
        self.session_steps = 0
        self.last_ckpt_time = time.monotonic()
        self.last_saved_step: int | None = None
        self.ckpt_failures: list[BaseException] = []
        from .metrics import TrainerMetrics
        from .progress import Progress

        self.progress = Progress(cfg.progress_interval_seconds)
        self.metrics = TrainerMetrics()
        self.server = None
        self.work = Path(opts.work_dir)
        self.step_delay = float(os.environ.get("KUBETUNE_STEP_DELAY_SECONDS", "0") or 0)
        self.total_gpus = 0
        self.base_gpu_seconds = 0.0

    # -- helpers
    def client(self):
        if self._client is None:
            from . import s3

            self._client = s3.make_client(self.cfg.s3)
        return self._client

    def set_phase(self, phase: str, **fields) -> None:
        self.progress.update(phase=phase, **fields)
        logs.rank0("phase", phase=phase, **fields)

    def gpu_seconds(self) -> float:
        """GPU-seconds of all attempts: those restored from the checkpoint plus this attempt's."""
        return self.base_gpu_seconds + (self.progress.elapsed() - self.progress.elapsed_offset) * self.total_gpus

    def check_stop_before_training(self) -> None:
        if self.stop:
            raise Preempted()

    # -- distributed
    def init_distributed(self) -> None:
        import torch

        self.cuda = _cuda()
        if self.cuda:
            torch.cuda.set_device(self.env.local_rank % max(1, torch.cuda.device_count()))
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.total_gpus = (self.env.world if self.cuda else 0)
        if self.env.world > 1 or self.cfg.training.deepspeed != "none":
            import datetime as _dt

            import torch.distributed as dist

            backend = "nccl" if self.cuda else "gloo"
            timeout = float(os.environ.get("KUBETUNE_DIST_TIMEOUT_SECONDS", "1800"))
            logs.log("distributed_init", backend=backend, rank=self.env.rank, world=self.env.world,
                     master=f"{self.env.master_addr}:{self.env.master_port}")
            try:
                dist.init_process_group(
                    backend, init_method=f"tcp://{self.env.master_addr}:{self.env.master_port}",
                    rank=self.env.rank, world_size=self.env.world,
                    timeout=_dt.timedelta(seconds=timeout),
                )
            except Exception as e:
                raise RetriableError(f"torch.distributed rendezvous at {self.env.master_addr}:"
                                     f"{self.env.master_port} failed: {e}") from e

    @property
    def distributed(self) -> bool:
        return self.env.world > 1

    def _deepspeed_env(self) -> None:
        """deepspeed.initialize reads the torch.distributed variables from the environment."""
        os.environ.setdefault("RANK", str(self.env.rank))
        os.environ.setdefault("WORLD_SIZE", str(self.env.world))
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))
        os.environ.setdefault("MASTER_ADDR", self.env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(self.env.master_port))

    def all_reduce(self, values: list[float]) -> list[float]:
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

    def _together(self, fn, what: str) -> None:
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

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.env.world
        dist.all_gather_object(out, obj)
        return out

    # -- phases
    def run(self) -> ExitCode:
        logs.set_rank(self.env.rank)
        if self.opts.install_signal_handlers:
            self.stop.install()
        if self.env.local_rank == 0 and self.opts.metrics_port is not None:
            from .metrics import MetricsServer

            self.server = MetricsServer(self.metrics, self.progress.as_json_dict, self.opts.metrics_port)
        code = ExitCode.RETRIABLE
        try:
            code = self._run()
            return code
        except Preempted:
            self.progress.update(force=True, message="preempted before training started; nothing new to save")
            logs.log("preempted_before_training", "warning")
            code = ExitCode.PREEMPTED
            return code
        except UserError as e:
            self.progress.update(force=True, phase="failed", message=str(e))
            code = ExitCode.USER_ERROR
            raise
        except BaseException as e:
            self.progress.update(force=True, phase="failed", message=f"{type(e).__name__}: {e}")
            raise
        finally:
            self._shutdown(code)

    def _shutdown(self, code: ExitCode) -> None:
        if self.store is not None and self.rank0:
            with contextlib.suppress(BaseException):
                self.store.wait(timeout=float(os.environ.get("KUBETUNE_SHUTDOWN_UPLOAD_TIMEOUT", "600")))
            with contextlib.suppress(BaseException):
                self.store.close(wait=False)
        if self.rank0:
            self.progress.write_termination_log(self.opts.termination_log)
        if self.server is not None:
            self.server.close()
        if self.opts.install_signal_handlers:
            self.stop.uninstall()
        if self.distributed or self.cfg.training.deepspeed != "none":
            with contextlib.suppress(Exception):
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()

    def _run(self) -> ExitCode:
        from . import data as D
        from . import model as M
        from .checkpoint import CheckpointStore
        from .sources import dataset_files, is_s3, model_source

        cfg, t = self.cfg, self.cfg.training
        self.set_phase("starting", total_steps=None)
        logs.rank0("trainer_start", job=f"{cfg.job.namespace}/{cfg.job.name}", attempt=attempt_number(),
                   method=cfg.method, world_size=self.env.world, pid=os.getpid())
        self.work.mkdir(parents=True, exist_ok=True)
        self.init_distributed()
        M.check_method_supported(cfg, self.cuda)
        if t.deepspeed != "none" and cfg.workers > 1:
            raise UserError("training.deepspeed with workers > 1 is not supported yet (ZeRO shards are "
                            "written per pod): use one worker with several GPUs, or deepspeed: none")
        self.precision = M.resolve_precision(t.precision, self.cuda)

        # 1. fail fast on S3: missing buckets, bad credentials, read-only keys
        from . import s3

        def check_s3() -> None:
            checks = [(cfg.checkpoint_prefix, "checkpoints.uri", True),
                      (cfg.output.uri, "output.uri", True)]
            for uri, fld in ((cfg.dataset.uri, "dataset.uri"), (cfg.dataset.validation_uri, "dataset.validationUri"),
                             (cfg.base_model.uri, "baseModel.uri")):
                if uri and is_s3(uri):
                    checks.append((uri, fld, False))
            for uri, fld, write in checks:
                s3.check_access(self.client(), uri, field=fld, write=write)
            logs.log("s3_access_ok", endpoint=cfg.s3.endpoint or "aws", checked=[c[0] for c in checks])

        self._together(check_s3 if self.rank0 else None, "checking S3 access")
        self.check_stop_before_training()

        # 2. base model files (tokenizer first: preflight needs it)
        self.set_phase("loading")
        rank_dir = self.work / f"rank{self.env.rank}"
        if rank_dir.exists():
            shutil.rmtree(rank_dir, ignore_errors=True)
        rank_dir.mkdir(parents=True)
        # one download per pod (its local rank 0), shared by the pod's other ranks
        model_dir = self.work / "base-model"
        fetched: list[str] = []
        self._together(lambda: fetched.append(model_source(cfg, self.client, model_dir,
                                                           download=self.env.local_rank == 0)),
                       "fetching the base model")
        src = fetched[0]
        tok = M.load_tokenizer(src, cfg)
        self.tokenizer = tok
        self.model_src = src
        self.check_stop_before_training()

        # 3. preflight
        self.set_phase("preflight")
        files = dataset_files(cfg.dataset.uri, self.client, rank_dir / "data", "dataset.uri")
        examples, report = D.encode_files(files, cfg.dataset, tok, t.max_seq_length)
        self._report_preflight(report, "dataset")
        D.check_bad_fraction(report, cfg.dataset)
        dataset_sha = D.file_sha256(p for p, _ in files)
        if cfg.dataset.validation_uri:
            vfiles = dataset_files(cfg.dataset.validation_uri, self.client, rank_dir / "val", "dataset.validationUri")
            eval_ex, vreport = D.encode_files(vfiles, cfg.dataset, tok, t.max_seq_length)
            self._report_preflight(vreport, "validation")
            D.check_bad_fraction(vreport, cfg.dataset, "validation dataset")
            train_ex = examples
        else:
            train_ex, eval_ex = D.split_validation(examples, cfg.dataset.validation_split, t.seed)
        self.train_seqs = D.build_sequences(train_ex, t.max_seq_length, t.packing)
        self.eval_seqs = D.build_sequences(eval_ex, t.max_seq_length, t.packing) if eval_ex else []
        self.batches = D.Batches(self.train_seqs, t.batch_size, self.env.world, t.seed)
        steps_per_epoch = self.batches.steps_per_epoch(t.gradient_accumulation_steps)
        total = t.max_steps if t.max_steps else max(1, math.ceil(t.epochs * steps_per_epoch))
        self.total_steps = total
        self.report = report
        self.dataset_sha = dataset_sha
        logs.rank0("dataset_ready", train_examples=len(train_ex), eval_examples=len(eval_ex),
                   train_sequences=len(self.train_seqs), eval_sequences=len(self.eval_seqs),
                   packing=t.packing, steps_per_epoch=steps_per_epoch, total_steps=total,
                   sha256=dataset_sha)
        self.progress.update(total_steps=total)
        self.metrics.safe(lambda: self.metrics.total_steps.set(total))
        self.check_stop_before_training()

        # 4. model, optimizer, schedule
        self.set_phase("loading")
        seed_everything(t.seed)
        self.model = M.load_model(src, cfg, self.precision, self.device)
        trainable, n_total = M.trainable_parameters(self.model)
        logs.rank0("model_loaded", source=cfg.base_model.uri, method=cfg.method, precision=self.precision.name,
                   trainable_parameters=trainable, total_parameters=n_total,
                   gradient_checkpointing=t.gradient_checkpointing, device=str(self.device))
        self._build_optimizer(total)
        self.check_stop_before_training()

        # 5. resume
        self.store = CheckpointStore(cfg.checkpoint_prefix, cfg.s3, cfg.checkpoints.keep_last,
                                     client=self.client(), registry=self.metrics.registry)
        self._resume()
        if self.state.dataset_sha256 and self.state.dataset_sha256 != dataset_sha:
            logs.rank0("dataset_changed", "warning", checkpoint_sha256=self.state.dataset_sha256,
                       sha256=dataset_sha, note="resuming anyway; data order may differ")
        self.state.dataset_sha256 = dataset_sha
        self.state.total_steps = total
        self.check_stop_before_training()

        # 6. train
        code = self._train_loop()
        if code != ExitCode.SUCCESS:
            return code

        # 7. final evaluation, export
        if self.eval_seqs and (self.state.last_eval_loss is None or self._eval_step != self.state.global_step):
            self._evaluate()
        return self._export()

    def _report_preflight(self, report, what: str) -> None:
        if not self.rank0:
            return
        for b in report.bad:
            logs.log("bad_record", "warning", dataset=what, file=b.file, line=b.line, reason=b.reason)
        if report.bad_count > len(report.bad):
            logs.log("bad_records_truncated", "warning", dataset=what, listed=len(report.bad), total=report.bad_count)
        if report.prefix_unstable:
            logs.log("chat_template_not_prefix_stable", "warning", dataset=what, records=report.prefix_unstable,
                     note="loss on all tokens of those records")
        logs.log("preflight", dataset=what, **report.summary())

    # -- optimizer
    def _build_optimizer(self, total: int) -> None:
        import torch
        from transformers import get_scheduler

        t = self.cfg.training
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.trainable = params
        decay = [p for n, p in params if p.ndim >= 2]
        no_decay = [p for n, p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        warmup = math.ceil(t.warmup_ratio * total)
        self.ds_engine = None
        self.scaler = None
        if t.deepspeed != "none":
            try:
                import deepspeed  # noqa: F401  (GPU image only)
            except Exception as e:
                raise UserError(f"training.deepspeed={t.deepspeed} needs the deepspeed package, which this "
                                f"trainer image lacks ({e}); build it with EXTRAS=trainer,deepspeed") from None
            self._deepspeed_env()

            from .model import deepspeed_config

            ds_cfg = deepspeed_config(self.cfg, self.precision)
            # DeepSpeed builds the optimizer from the preset (DeepSpeedCPUAdam under offload);
            # our schedule is wrapped around it so warm-up/decay match the non-DeepSpeed path.
            engine, opt, _, sched = deepspeed.initialize(
                model=self.model, model_parameters=groups, config=ds_cfg,
                lr_scheduler=lambda o: get_scheduler(t.lr_scheduler, o, num_warmup_steps=warmup,
                                                     num_training_steps=total))
            self.ds_engine = engine
            self.ddp_model = engine
            self.optimizer, self.scheduler = opt, sched
            return
        fused = self.cuda
        self.optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, fused=fused)
        self.scheduler = get_scheduler(t.lr_scheduler, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=total)
        if self.precision.needs_scaler:
            self.scaler = torch.amp.GradScaler("cuda")
        self.ddp_model = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(self.model, device_ids=[self.device.index] if self.cuda else None)

    # -- checkpoints
    def _resume(self) -> None:
        import torch

        ckpt_dir = self.work / f"rank{self.env.rank}" / "restore"
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        info = self.store.restore_latest(ckpt_dir)
        steps = self.gather_objects(info.step if info is not None else None)
        if len(set(steps)) > 1:
            raise RetriableError(f"ranks restored different checkpoints (steps {steps}); retrying the attempt")
        if info is None:
            logs.rank0("fresh_start", prefix=self.cfg.checkpoint_prefix)
            return
        st = TrainState.from_dict(json.loads((ckpt_dir / STATE_FILE).read_text()))
        if st.format_version != FORMAT_VERSION:
            raise UserError(f"checkpoint {info.uri} has format {st.format_version}, this trainer reads "
                            f"{FORMAT_VERSION}")
        if self.ds_engine is not None:
            self.ds_engine.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")
        else:
            from safetensors.torch import load_file

            weights = load_file(str(ckpt_dir / WEIGHTS_FILE))
            by_name = dict(self.trainable)
            missing = set(by_name) - set(weights)
            if missing:
                raise UserError(f"checkpoint {info.uri} does not match the model (method or lora settings "
                                f"changed?): missing {sorted(missing)[:5]}")
            with torch.no_grad():
                for n, p in by_name.items():
                    p.copy_(weights[n].to(p.device, p.dtype))
            self.optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location=self.device,
                                                      weights_only=False))
            self.scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=False))
            if self.scaler is not None and (ckpt_dir / "scaler.pt").exists():
                self.scaler.load_state_dict(torch.load(ckpt_dir / "scaler.pt", weights_only=False))
        rngs = torch.load(ckpt_dir / "rng.pt", weights_only=False)
        if st.world_size == self.env.world and self.env.rank < len(rngs):
            set_rng_state(rngs[self.env.rank], self.cuda)
        else:
            seed_everything(self.cfg.training.seed + 1000 * st.global_step + self.env.rank)
        if st.global_micro_batch != self.batches.global_micro:
            # world size changed: keep the position in sequences, not micro-batches
            st.micro_in_epoch = min(self.batches.micro_per_epoch,
                                    st.sequences_in_epoch // self.batches.global_micro)
            logs.rank0("resume_world_size_changed", "warning", old=st.world_size, new=self.env.world)
        self.state = st
        self.state.world_size = self.env.world
        self.state.global_micro_batch = self.batches.global_micro
        self.resumed_from = st.global_step
        self.last_saved_step = st.global_step
        self.progress.elapsed_offset = st.elapsed_seconds
        self.base_gpu_seconds = st.gpu_seconds
        self.metrics.safe(lambda: self.metrics.tokens.inc(st.tokens_seen))
        last = info.to_ref()
        self.progress.update(force=True, step=st.global_step, resumed_from_step=st.global_step,
                             tokens_seen=st.tokens_seen, last_checkpoint=last, loss=st.last_loss)
        logs.log("resumed", step=st.global_step, epoch=st.epoch, micro_in_epoch=st.micro_in_epoch,
                   checkpoint=info.uri)
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    def _save_checkpoint(self, reason: str):
        """Local save (blocking, all ranks take part), then background upload by rank 0."""
        import torch

        t0 = time.monotonic()
        step = self.state.global_step
        self.state.gpu_seconds = self.gpu_seconds()
        self.state.elapsed_seconds = self.progress.elapsed()
        rngs = self.gather_objects(rng_state(self.cuda))
        # the same path on every rank (DeepSpeed ranks of one pod write their shards into it)
        local = self.work / "checkpoints" / f"step-{step:09d}"
        if self.rank0 and local.exists():
            shutil.rmtree(local, ignore_errors=True)
        if self.ds_engine is not None:
            self.barrier()
        if self.rank0 or self.ds_engine is not None:
            local.mkdir(parents=True, exist_ok=True)
        if self.ds_engine is not None:
            self.ds_engine.save_checkpoint(str(local / "deepspeed"), tag="state", save_latest=False)
            self.barrier()  # every shard is on disk before rank 0 hands the directory over
        if not self.rank0:
            return None
        self.progress.update(phase="checkpointing")
        if self.ds_engine is None:
            from safetensors.torch import save_file

            save_file({n: p.detach().to("cpu").contiguous() for n, p in self.trainable}, str(local / WEIGHTS_FILE))
            torch.save(self.optimizer.state_dict(), local / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), local / "scheduler.pt")
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), local / "scaler.pt")
        torch.save(rngs, local / "rng.pt")
        (local / STATE_FILE).write_text(json.dumps(asdict(self.state), indent=1))
        blocked = time.monotonic() - t0
        meta = {"global_step": step, "epoch": self.state.epoch, "loss": self.state.last_loss,
                "tokens_seen": self.state.tokens_seen, "reason": reason, "method": self.cfg.method,
                "attempt": attempt_number()}
        fut = self.store.save_async(step, local, meta)
        fut.add_done_callback(self._on_checkpoint_done)
        self.last_saved_step = step
        self.last_ckpt_time = time.monotonic()
        self.metrics.safe(lambda: self.metrics.checkpoint_save.set(blocked))
        logs.log("checkpoint_saved_locally", step=step, reason=reason, seconds=round(blocked, 3))
        self.progress.update(phase="training")
        return fut

    def _on_checkpoint_done(self, fut) -> None:
        try:
            info = fut.result()
        except BaseException as e:  # noqa: BLE001 - reported, retried by the next checkpoint
            self.ckpt_failures.append(e)
            logs.log("checkpoint_upload_failed", "error", error=f"{type(e).__name__}: {e}")
            return
        try:
            self.progress.update(last_checkpoint=info.to_ref())
            logs.log("checkpoint_durable", step=info.step, uri=info.uri, files=len(info.files or []))
        except Exception:
            pass

    # -- loop
    def _train_loop(self) -> ExitCode:
        import torch

        from .data import IGNORE, collate

        cfg, t = self.cfg, self.cfg.training
        st = self.state
        ga = t.gradient_accumulation_steps
        world = self.env.world
        pad_id = self.tokenizer.pad_token_id
        every_steps = cfg.checkpoints.every_steps
        every_s = cfg.checkpoints.every_minutes * 60 if cfg.checkpoints.every_minutes else None
        self._eval_step = -1
        model = self.ddp_model
        model.train()
        autocast = (torch.autocast(self.device.type, dtype=self.precision.dtype)
                    if self.precision.autocast and self.ds_engine is None else contextlib.nullcontext())
        thr = Throughput()
        self.last_ckpt_time = time.monotonic()
        self.set_phase("training", step=st.global_step)
        logs.rank0("training_start", step=st.global_step, total_steps=self.total_steps, epoch=st.epoch)

        while st.global_step < self.total_steps:
            mpe = self.batches.micro_per_epoch
            micro_ids = list(range(st.micro_in_epoch, min(st.micro_in_epoch + ga, mpe)))
            mbs = [self.batches.micro_batch(st.epoch, m, self.env.rank) for m in micro_ids]
            local_items = sum(sum(1 for l in s.labels[1:] if l != IGNORE) for mb in mbs for s in mb)
            n_items = max(1.0, self.all_reduce([float(local_items)])[0])
            loss_sum = 0.0
            tokens = samples = 0
            for i, seqs in enumerate(mbs):
                last = i == len(mbs) - 1
                batch = {k: v.to(self.device) for k, v in collate(seqs, pad_id).items()}
                sync = contextlib.nullcontext()
                if self.distributed and self.ds_engine is None and not last:
                    sync = model.no_sync()
                with sync:
                    with autocast:
                        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                    labels=batch["labels"], num_items_in_batch=n_items, use_cache=False)
                    loss = out.loss.float()
                    loss_sum += float(loss.detach()) * n_items
                    scaled = loss * world  # DDP/DeepSpeed average gradients over ranks
                    if self.ds_engine is not None:
                        self.ds_engine.set_gradient_accumulation_boundary(last)
                        self.ds_engine.backward(scaled, scale_wrt_gas=False)
                        self.ds_engine.step()
                    elif self.scaler is not None:
                        self.scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
                tokens += sum(len(s) for s in seqs)
                samples += len(seqs)
            if self.ds_engine is None:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                if t.max_grad_norm and t.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], t.max_grad_norm)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            st.micro_in_epoch = micro_ids[-1] + 1
            if st.micro_in_epoch >= mpe:
                st.epoch += 1
                st.micro_in_epoch = 0
            st.sequences_in_epoch = st.micro_in_epoch * self.batches.global_micro
            st.global_step += 1
            self.session_steps += 1
            if self.step_delay:  # KUBETUNE_STEP_DELAY_SECONDS: slow steps down (tests, demos)
                time.sleep(self.step_delay)

            due = 0.0
            if self.rank0 and every_s is not None and time.monotonic() - self.last_ckpt_time >= every_s:
                due = 1.0
            g = self.all_reduce([loss_sum, float(tokens), float(samples), 1.0 if self.stop else 0.0, due])
            step_loss = g[0] / n_items
            st.last_loss = step_loss
            st.tokens_seen += int(g[1])
            st.samples_seen += int(g[2])
            thr.tokens += int(g[1])
            thr.samples += int(g[2])
            thr.steps += 1
            self._after_step(step_loss, int(g[1]), thr)

            if t.eval_steps and self.eval_seqs and st.global_step % t.eval_steps == 0:
                self._evaluate()
                model.train()

            stop = g[3] > 0
            if stop:
                return self._preempt()
            if (every_steps and st.global_step % every_steps == 0) or g[4] > 0:
                if st.global_step < self.total_steps:
                    self._save_checkpoint("interval")
            self._raise_if_uploads_keep_failing()
        logs.rank0("training_done", step=st.global_step, loss=st.last_loss, tokens_seen=st.tokens_seen)
        return ExitCode.SUCCESS

    def _after_step(self, loss: float, tokens: int, thr: Throughput) -> None:
        st, t = self.state, self.cfg.training
        lr = float(self.scheduler.get_last_lr()[0])
        tps, sps, steps_ps = thr.rates()
        m = self.metrics
        m.safe(lambda: (m.step.set(st.global_step), m.loss.set(loss), m.lr.set(lr), m.tps.set(tps),
                        m.sps.set(sps), m.tokens.inc(tokens)))
        self.progress.update(phase="training", step=st.global_step, loss=loss, learning_rate=lr,
                             tokens_per_second=round(tps, 3), tokens_seen=st.tokens_seen,
                             epoch=round(st.epoch + st.micro_in_epoch / self.batches.micro_per_epoch, 4),
                             steps_per_second=round(steps_ps, 6))
        if st.global_step % t.logging_steps == 0 or st.global_step == self.total_steps or st.global_step == 1:
            logs.rank0("step", step=st.global_step, total_steps=self.total_steps, loss=round(loss, 6),
                       loss_exact=loss, learning_rate=lr, epoch=st.epoch, tokens_per_second=round(tps, 1),
                       samples_per_second=round(sps, 2), tokens_seen=st.tokens_seen)
            thr.reset()  # rates over the last logging window

    def _raise_if_uploads_keep_failing(self) -> None:
        if len(self.ckpt_failures) >= 3:
            e = self.ckpt_failures[-1]
            if isinstance(e, KubetuneError):
                raise e
            raise RetriableError(f"checkpoint uploads keep failing: {e}") from e

    def _preempt(self) -> ExitCode:
        st = self.state
        logs.rank0("preempting", step=st.global_step, signal=self.stop.signal)
        fut = None
        if self.last_saved_step != st.global_step:
            fut = self._save_checkpoint("sigterm")
        ok = True
        if self.rank0:
            self.set_phase("uploading")
            try:
                info = self.store.wait()
                ok = info is not None and info.step == st.global_step and not (fut and fut.exception())
            except BaseException as e:  # noqa: BLE001
                logs.log("checkpoint_upload_failed", "error", error=f"{type(e).__name__}: {e}")
                ok = False
        ok = self.agree(ok)
        if not ok:
            raise RetriableError(f"preempted at step {st.global_step} but the checkpoint did not become durable")
        self.progress.update(force=True, phase="checkpointing", step=st.global_step,
                             message=f"preempted ({self.stop.signal}); checkpoint at step {st.global_step} is durable")
        logs.rank0("preempted", step=st.global_step, exit_code=int(ExitCode.PREEMPTED))
        return ExitCode.PREEMPTED

    # -- evaluation
    def _evaluate(self) -> float | None:
        import torch

        from .data import IGNORE, collate

        if not self.eval_seqs:
            return None
        model = self.ddp_model
        model.eval()
        t = self.cfg.training
        mine = self.eval_seqs[self.env.rank::self.env.world]
        total = count = 0.0
        autocast = (torch.autocast(self.device.type, dtype=self.precision.dtype)
                    if self.precision.autocast and self.ds_engine is None else contextlib.nullcontext())
        with torch.no_grad():
            for i in range(0, len(mine), t.batch_size):
                seqs = mine[i:i + t.batch_size]
                batch = {k: v.to(self.device) for k, v in collate(seqs, self.tokenizer.pad_token_id).items()}
                n = sum(sum(1 for l in s.labels[1:] if l != IGNORE) for s in seqs)
                if n == 0:
                    continue
                with autocast:
                    out = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                     labels=batch["labels"], num_items_in_batch=float(n), use_cache=False)
                total += float(out.loss.float()) * n
                count += n
        total, count = self.all_reduce([total, count])
        loss = total / count if count else None
        self.state.last_eval_loss = loss
        self._eval_step = self.state.global_step
        if loss is not None:
            self.metrics.safe(lambda: self.metrics.eval_loss.set(loss))
            self.progress.update(eval_loss=loss)
            logs.rank0("eval", step=self.state.global_step, eval_loss=round(loss, 6), sequences=len(self.eval_seqs))
        return loss

    # -- export
    def _export(self) -> ExitCode:
        from .export import export_output

        self.set_phase("uploading", step=self.state.global_step)
        uri = export_output(self)
        if self.rank0:
            if self.store is not None:
                with contextlib.suppress(BaseException):
                    self.store.wait()
            self.progress.update(force=True, phase="done", output_uri=uri, step=self.state.global_step,
                                 loss=self.state.last_loss, eval_loss=self.state.last_eval_loss,
                                 tokens_seen=self.state.tokens_seen)
            logs.log("done", output_uri=uri, step=self.state.global_step, loss=self.state.last_loss,
                     eval_loss=self.state.last_eval_loss, tokens_seen=self.state.tokens_seen,
                     elapsed_seconds=round(self.progress.elapsed(), 2))
        self.barrier()
        return ExitCode.SUCCESS


def _rfc3339(t: Any) -> str:
    if isinstance(t, datetime):
        return t.astimezone(timezone.utc).isoformat()
    if isinstance(t, (int, float)):
        return datetime.fromtimestamp(t, timezone.utc).isoformat()
    return str(t)


def attempt_number() -> int | None:
    """The attempt (0-based, from the operator's environment), or None when not set."""
    v = os.environ.get(envvars.ATTEMPT, "")
    try:
        return int(v)
    except ValueError:
        return None


def _cuda() -> bool:
    from .model import cuda_available

    return cuda_available()


def run(cfg: TrainerConfig, opts: RunOptions | None = None, dist_env: DistEnv | None = None) -> ExitCode:
    """Train one attempt of the job; raises KubetuneError subclasses for the exit codes."""
    return Run(cfg, opts or RunOptions.from_environ(), dist_env).run()
