"""This attempt's checkpoints: *when* and *by whom* they are taken, over the format (`state`) and
the store (`checkpoint.CheckpointStore`).

- claim: rank 0 makes this attempt the owner of the job's prefix (`fence`) before anything is
  read or written; every rank then carries the attempt's token, and the store checks it before
  each commit, clear and prune (a newer attempt makes this one stop: `Fenced`, at once);
- resume: every rank restores the newest valid checkpoint of this job (its UID's prefix), else the
  one `checkpoints.resumeFrom` names, and all check they got the same step; a checkpoint that
  does not fit the config or the data (`compat`) is a UserError naming what differs;
- save: all ranks write locally (blocking; RNG states gathered), then rank 0 alone uploads in the
  background; under DeepSpeed every rank writes and uploads its own shards (into a directory of
  its own, so ranks in one pod or in several pods behave alike) and rank 0 commits the manifest
  over all of them once every rank's part is in S3 (`shards`). Three failed uploads in a row end
  the attempt;
- at a stop, and after the last step (before any export): the current step is saved (unless it
  already is), every uploading rank waits for its upload (rank 0 for the commit), and all ranks
  agree it is durable before the run exits PREEMPTED or goes on to export.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

from kubetune_contract.config import TrainerConfig

from . import compat, logs
from . import state as S
from .dist import Dist
from .errors import KubetuneError, RetriableError
from .fence import AttemptToken, Fence, Fenced
from .manifest import now_rfc3339
from .state import TrainingParts, TrainState

MAX_UPLOAD_FAILURES = 3


class Checkpointing:
    def __init__(
        self, cfg: TrainerConfig, dist: Dist, work: Path, store: Any, progress: Any, metrics: Any, attempt: int | None
    ) -> None:
        self.cfg, self.dist, self.work, self.store = cfg, dist, work, store
        self.progress, self.metrics, self.attempt = progress, metrics, attempt
        self.last_saved_step: int | None = None  # on every rank: at a stop all must agree whether to save
        self.last_time = time.monotonic()  # rank 0's clock decides time-based checkpoints
        self.failures: list[BaseException] = []
        self.on_blocked: Any = None  # called with the seconds each save held training up
        self.uploads = dist.rank0  # whether this rank uploads (every rank once it saved ZeRO shards)
        self.fence: Fence | None = None  # once claimed (claim)
        self.fenced: Fenced | None = None  # a newer attempt took over: stop at once

    @classmethod
    def open(
        cls,
        cfg: TrainerConfig,
        dist: Dist,
        work: Path,
        client: Any,
        progress: Any,
        metrics: Any,
        attempt: int | None,
        pod_uid: str = "",
    ) -> Checkpointing:
        """Claim the job's prefix for this attempt (rank 0; every rank learns the token), then open
        the job's CheckpointStore over it (its upload metrics on the trainer's registry)."""
        from .checkpoint import CheckpointStore

        n = attempt if attempt is not None else 0
        fence = Fence(client, cfg.checkpoint_prefix, AttemptToken(n, pod_uid))
        dist.together((lambda: fence.claim(now_rfc3339())) if dist.rank0 else None, "claiming the job's prefix")
        fence = Fence(client, cfg.checkpoint_prefix, AttemptToken(n, dist.gather_objects(pod_uid)[0]))
        store = CheckpointStore(
            cfg.checkpoint_prefix,
            cfg.s3,
            cfg.checkpoints.keep_last,
            client=client,
            attempt=n,
            fence=fence.check,
            job_uid=cfg.job.uid,
            registry=metrics.registry,
        )
        self = cls(cfg, dist, work, store, progress, metrics, attempt)
        self.fence = fence
        return self

    def resume(self, parts: TrainingParts, batches: Any, dataset_sha256: str = "") -> tuple[TrainState, Any] | None:
        """(state, checkpoint info) of the newest valid checkpoint, loaded into parts; None for a
        fresh start."""
        env = self.dist.env
        ckpt_dir = self.work / f"rank{env.rank}" / "restore"
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        info = self.store.restore_latest(ckpt_dir)
        source = self.cfg.checkpoints.resume_from
        if info is None and source:  # this job has none of its own yet: the one the user named
            info = self.store.restore_latest(ckpt_dir, source=source)
            logs.rank0("resuming_other_job", source=source, checkpoint=info.uri if info else None)
        steps = self.dist.gather_objects(info.step if info is not None else None)
        if len(set(steps)) > 1:
            raise RetriableError(f"ranks restored different checkpoints (steps {steps}); retrying the attempt")
        if info is None:
            logs.rank0("fresh_start", prefix=self.cfg.checkpoint_prefix)
            return None
        compat.check_config(info.uri, info.meta, self.cfg)
        compat.check_position(
            info.uri,
            S.read_state(ckpt_dir, info.uri),
            micro_per_epoch=batches.micro_per_epoch,
            global_micro=batches.global_micro,
            sha256=dataset_sha256,
        )
        st = S.restore(
            ckpt_dir,
            info.uri,
            parts,
            self.dist,
            global_micro=batches.global_micro,
            micro_per_epoch=batches.micro_per_epoch,
            seed=self.cfg.training.seed,
        )
        self.last_saved_step = st.global_step
        logs.log("resumed", step=st.global_step, epoch=st.epoch, micro_in_epoch=st.micro_in_epoch, checkpoint=info.uri)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return st, info

    def due_by_time(self) -> bool:
        """everyMinutes has passed since the last checkpoint (rank 0's answer is the one used)."""
        every = self.cfg.checkpoints.every_minutes
        return bool(self.dist.rank0 and every and time.monotonic() - self.last_time >= every * 60)

    def save(self, st: TrainState, parts: TrainingParts, reason: str) -> Any:
        """Local save (blocking, all ranks take part), then background upload by rank 0; the
        upload's future on rank 0, else None."""
        t0 = time.monotonic()
        step = st.global_step
        env = self.dist.env
        sharded = parts.ds_engine is not None and self.dist.distributed
        local = self.work / "checkpoints" / (f"rank-{env.rank}" if sharded else "") / f"step-{step:09d}"
        self.last_saved_step = step
        if self.dist.rank0:
            self.progress.update(phase="checkpointing")
        if sharded:
            self.uploads = True
            # leftovers of an earlier attempt at this step go before any rank uploads into it
            self.dist.together((lambda: self.store.clear_step(step)) if self.dist.rank0 else None, "clearing a step")
        if not S.write(local, parts, st, self.dist):
            return None
        blocked = time.monotonic() - t0
        meta = {
            "global_step": step,
            "epoch": st.epoch,
            "loss": st.last_loss,
            "tokens_seen": st.tokens_seen,
            "reason": reason,
            "method": self.cfg.method,
            "attempt": self.attempt,
            "token": str(self.fence.token) if self.fence else None,
            "job": {"namespace": self.cfg.job.namespace, "name": self.cfg.job.name, "uid": self.cfg.job.uid},
            "config": compat.fingerprint(self.cfg),
        }
        fut = self.store.save_async(step, local, meta, rank=env.rank, world=env.world if sharded else 1)
        fut.add_done_callback(self._on_upload_done)
        self.last_time = time.monotonic()
        self.metrics.safe(lambda: self.metrics.checkpoint_save.set(blocked))
        if self.on_blocked is not None:
            held = time.monotonic() - t0  # the local write and the store's staging
            self.metrics.safe(lambda: self.on_blocked(held))
        logs.log("checkpoint_saved_locally", step=step, reason=reason, seconds=round(blocked, 3))
        self.progress.update(phase="training")
        return fut

    def _on_upload_done(self, fut: Any) -> None:
        try:
            info = fut.result()
        except BaseException as e:  # noqa: BLE001 - reported, retried by the next checkpoint
            if isinstance(e, Fenced):
                self.fenced = e  # not retried: the step loop stops at once
            self.failures.append(e)
            logs.log("checkpoint_upload_failed", "error", error=f"{type(e).__name__}: {e}")
            return
        if not self.dist.rank0:  # a shard uploader: rank 0 commits
            logs.log("checkpoint_shards_durable", step=info.step, uri=info.uri, files=len(info.files or []))
            return
        with contextlib.suppress(Exception):
            self.progress.update(last_checkpoint=info.to_ref())
            logs.log("checkpoint_durable", step=info.step, uri=info.uri, files=len(info.files or []))

    def raise_if_uploads_keep_failing(self) -> None:
        if self.fenced is not None:
            raise self.fenced
        if len(self.failures) >= MAX_UPLOAD_FAILURES:
            e = self.failures[-1]
            if isinstance(e, KubetuneError):
                raise e
            raise RetriableError(f"checkpoint uploads keep failing: {e}") from e

    def make_durable(self, st: TrainState, parts: TrainingParts, reason: str = "sigterm") -> None:
        """At a stop (reason sigterm) or after the last step (final): this step saved and
        uploaded, or RetriableError (Fenced: a newer attempt took over) on every rank."""
        fut = None
        if self.last_saved_step != st.global_step:
            fut = self.save(st, parts, reason)
        ok = True
        if self.uploads:
            if self.dist.rank0:
                self.progress.update(phase="uploading")
                logs.log("phase", phase="uploading")
            try:
                info = self.store.wait()
                ok = info is not None and info.step == st.global_step and not (fut and fut.exception())
            except BaseException as e:  # noqa: BLE001
                logs.log("checkpoint_upload_failed", "error", error=f"{type(e).__name__}: {e}")
                if isinstance(e, Fenced):
                    self.fenced = e
                ok = False
        if not self.dist.agree(ok):
            if self.fenced is not None:
                raise self.fenced
            what = "preempted" if reason == "sigterm" else "trained"
            raise RetriableError(f"{what} to step {st.global_step} but the checkpoint did not become durable")

    def wait(self, timeout: float | None = None) -> None:
        """An uploading rank: let an upload in flight finish (errors were reported when they happened)."""
        if self.uploads:
            with contextlib.suppress(BaseException):
                self.store.wait(timeout=timeout)

    def close(self, timeout: float) -> None:
        if self.uploads:
            self.wait(timeout)
            with contextlib.suppress(BaseException):
                self.store.close(wait=False)
