"""One attempt of a job: the phase script and the step loop.

    run(cfg, opts) → starting (S3 access) → loading (base model) → preflight (dataset) →
    loading (model, optimizer) → resume → training (step loop, checkpoints) → evaluate → export

Each phase hands the next what it made, as named parts: `prepare.Prepared` (tokenizer, data,
batches, step count), `state.TrainingParts` (model, optimizer, scheduler, scaler or DeepSpeed
engine), `state.TrainState` (step and data position). Around it: `options` (every knob, read once
by the entry point), `dist` (ranks, collectives), `signals` (the stop flag), `checkpointing`
(when and by whom), `state` (the checkpoint format), `checkpoint` (the S3 store), `export` (the
result), `progress`/`metrics`/`logs`.

The step loop (why a custom one: docs/design/trainer.md): one optimizer step is
`gradient_accumulation_steps` micro-batches, the loss token-weighted over the step and all ranks;
after each step one all-reduce carries [loss sum, tokens, sequences, stop seen, checkpoint due by
rank 0's clock], so every rank stops and saves at the same step. A checkpoint blocks only for the
local save (CheckpointStore uploads in the background, manifest last); on SIGTERM the run
finishes the step, saves, waits for the upload and exits PREEMPTED. Resume restores weights,
optimizer, scheduler, scaler, every rank's RNG and the data position: bit-exact on the same world.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kubetune_contract.config import TrainerConfig
from kubetune_contract.progress import ExitCode

from . import dist as D
from . import logs, step, zero
from . import prepare as P
from . import state as S
from .checkpointing import Checkpointing
from .errors import UserError
from .gpu import use_cuda
from .options import TrainerOptions
from .signals import Preempted, StopFlag
from .state import TrainingParts, TrainState

StepHook = Callable[[TrainState], None]
"""Called on every rank after each optimizer step (before the step's all-reduce)."""


class Run:
    def __init__(
        self,
        cfg: TrainerConfig,
        opts: TrainerOptions,
        stop: StopFlag | None = None,
        step_hooks: Iterable[StepHook] = (),
    ) -> None:
        from .goodput import Goodput
        from .metrics import TrainerMetrics
        from .progress import Progress

        self.cfg, self.opts = cfg, opts
        self.own_signals = stop is None  # a caller that brings its own stop flag owns the signals
        self.stop = stop if stop is not None else StopFlag()  # (an unset StopFlag is falsy)
        self.step_hooks = list(step_hooks)
        self.dist = D.Dist(opts.dist)  # device and process group come with dist.start
        self.rank0 = self.dist.rank0
        self.work = Path(opts.work_dir)
        self.progress = Progress(cfg.progress_interval_seconds)
        self.metrics = TrainerMetrics()
        self.goodput = Goodput(self.metrics)  # process start → first step, productive / recomputed steps
        self.mfu_meter: Any = None  # mfu.MfuMeter once the model is loaded
        self.server: Any = None
        self.ckpt: Checkpointing | None = None
        self._client: Any = None
        self.state = TrainState()
        self.data: P.Prepared
        self.parts: TrainingParts
        self.precision: Any = None
        self.resumed_from: int | None = None
        self.base_gpu_seconds = 0.0  # restored from the checkpoint
        self._eval_step = -1

    # -- helpers
    def client(self) -> Any:
        if self._client is None:
            from . import s3

            self._client = s3.make_client(self.cfg.s3)
        return self._client

    def set_phase(self, phase: str, **fields: Any) -> None:
        self.progress.update(phase=phase, **fields)
        logs.rank0("phase", phase=phase, **fields)

    def gpu_seconds(self) -> float:
        """GPU-seconds of all attempts: those restored from the checkpoint plus this attempt's."""
        gpus = self.dist.env.world if self.dist.cuda else 0
        return self.base_gpu_seconds + (self.progress.elapsed() - self.progress.elapsed_offset) * gpus

    # -- the phase script
    def run(self) -> ExitCode:
        logs.set_rank(self.dist.env.rank)
        if self.own_signals:
            self.stop.install()
        if self.dist.env.local_rank == 0 and self.opts.metrics_port is not None:
            from .metrics import MetricsServer

            self.server = MetricsServer(self.metrics, self.progress.as_json_dict, self.opts.metrics_port)
        try:
            return self._phases()
        except Preempted:
            self.progress.update(force=True, message="preempted before training started; nothing new to save")
            logs.log("preempted_before_training", "warning")
            return ExitCode.PREEMPTED
        except UserError as e:
            self.progress.update(force=True, phase="failed", message=str(e))
            raise
        except BaseException as e:
            self.progress.update(force=True, phase="failed", message=f"{type(e).__name__}: {e}")
            raise
        finally:
            self._shutdown()

    def _phases(self) -> ExitCode:
        from . import model as M

        cfg = self.cfg
        self.set_phase("starting", total_steps=None)
        logs.rank0(
            "trainer_start",
            job=f"{cfg.job.namespace}/{cfg.job.name}",
            attempt=self.opts.attempt,
            method=cfg.method,
            world_size=self.dist.env.world,
            pid=os.getpid(),
        )
        self.work.mkdir(parents=True, exist_ok=True)
        self.dist = D.start(
            self.opts.dist,
            cuda=use_cuda(cfg.gpus_per_worker, self.opts.force_cpu),
            timeout_seconds=self.opts.dist_timeout_seconds,
            deepspeed=cfg.training.deepspeed != "none",
        )
        M.check_method_supported(cfg, self.dist.cuda)
        if zero.enabled(cfg):
            zero.check_supported(cfg, self.dist.cuda, self.opts.force_cpu)
            zero.require(self.dist.cuda)  # imported now: a missing package fails before the model loads
            D.export_deepspeed_env(self.dist.env)  # zero.Init (ZeRO-3 loading) reads them too
        self.precision = M.resolve_precision(cfg.training.precision, self.dist.cuda)

        self.dist.together(
            (lambda: P.check_s3_access(cfg, self.client())) if self.rank0 else None, "checking S3 access"
        )
        self.stop.raise_if_set()
        self.set_phase("loading")
        rank_dir = P.fresh_rank_dir(self.work, self.dist.env.rank)
        model_src, tokenizer = P.fetch_base_model(cfg, self.dist, self.client, self.work)
        self.stop.raise_if_set()
        self.set_phase("preflight")
        self.data = P.preflight(cfg, self.dist, self.client, rank_dir, tokenizer, model_src)
        self.progress.update(total_steps=self.data.total_steps)
        self.metrics.safe(lambda: self.metrics.total_steps.set(self.data.total_steps))
        self.stop.raise_if_set()
        self.parts = self._load_model()
        self.stop.raise_if_set()
        self._resume()
        self.stop.raise_if_set()
        code = self._train_loop()
        if code != ExitCode.SUCCESS:
            return code
        assert self.ckpt is not None  # the last step is durable before anything that might fail
        self.ckpt.make_durable(self.state, self.parts, "final")
        if self.data.eval_seqs and (self.state.last_eval_loss is None or self._eval_step != self.state.global_step):
            self._evaluate()
        return self._export()

    def _shutdown(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close(timeout=self.opts.shutdown_upload_timeout_seconds)
        self.goodput.close(self.state.global_step)
        if self.rank0:
            self.progress.update(**self.goodput.progress_fields())
            self.progress.write_termination_log(self.opts.termination_log)
        if self.server is not None:
            self.server.close()
        if self.own_signals:
            self.stop.uninstall()
        if self.dist.distributed or self.cfg.training.deepspeed != "none":
            D.teardown()

    # -- the model
    def _load_model(self) -> TrainingParts:
        from . import model as M

        cfg, t = self.cfg, self.cfg.training
        self.set_phase("loading")
        S.seed_everything(t.seed)
        model = M.load_model(self.data.model_src, cfg, self.precision, self.dist.device)
        trainable, n_total = M.trainable_parameters(model)
        logs.rank0(
            "model_loaded",
            source=cfg.base_model.uri,
            method=cfg.method,
            precision=self.precision.name,
            trainable_parameters=trainable,
            total_parameters=n_total,
            gradient_checkpointing=getattr(M.unwrap(model), "kubetune_checkpointing", t.gradient_checkpointing),
            device=str(self.dist.device),
        )
        from . import mfu

        self.mfu_meter = mfu.meter_for(
            model, trainable, n_total, self.data.train_seqs, cfg.method, self.dist, self.opts
        )
        if self.mfu_meter is not None:
            fpt = self.mfu_meter.flops_per_token
            self.metrics.safe(lambda: self.metrics.known(self.metrics.flops_per_token, fpt))
        return M.build_training_parts(model, cfg, self.precision, self.data.total_steps, self.dist)

    def _resume(self) -> None:
        env, data = self.dist.env, self.data
        self.ckpt = Checkpointing.open(
            self.cfg, self.dist, self.work, self.client(), self.progress, self.metrics, *self.opts.token
        )
        self.ckpt.on_blocked = self.goodput.checkpoint_blocked
        if self.rank0:
            self.goodput.watch_highwater(self.client(), self.cfg.checkpoint_prefix, self.cfg.progress_interval_seconds)
        resumed = self.ckpt.resume(self.parts, data.batches, data.dataset_sha256)
        if resumed is not None:
            st, info = resumed
            self.state, self.resumed_from = st, st.global_step
            self.progress.elapsed_offset = st.elapsed_seconds
            self.base_gpu_seconds = st.gpu_seconds
            self.metrics.safe(lambda: self.metrics.tokens.inc(st.tokens_seen))
            self.progress.update(
                force=True,
                step=st.global_step,
                resumed_from_step=st.global_step,
                tokens_seen=st.tokens_seen,
                last_checkpoint=info.to_ref(),
                loss=st.last_loss,
            )
        st = self.state
        st.highest_step = self.goodput.resume_from(st.highest_step, st.global_step)
        # a fresh state records this run's world too, so that resuming it restores every rank's RNG
        st.world_size, st.global_micro_batch = env.world, data.batches.global_micro
        if st.dataset_sha256 and st.dataset_sha256 != data.dataset_sha256:
            logs.rank0(
                "dataset_changed",
                "warning",
                checkpoint_sha256=st.dataset_sha256,
                sha256=data.dataset_sha256,
                note="resuming anyway; data order may differ",
            )
        st.dataset_sha256, st.total_steps = data.dataset_sha256, data.total_steps

    def _save_checkpoint(self, reason: str) -> Any:
        self.state.gpu_seconds = self.gpu_seconds()
        self.state.elapsed_seconds = self.progress.elapsed()
        assert self.ckpt is not None
        return self.ckpt.save(self.state, self.parts, reason)

    # -- the step loop
    def _train_loop(self) -> ExitCode:
        from . import model as M
        from .metrics import Throughput

        cfg, t, st, parts, dist = self.cfg, self.cfg.training, self.state, self.parts, self.dist
        batches, total_steps = self.data.batches, self.data.total_steps
        ga, rank = t.gradient_accumulation_steps, dist.env.rank
        every_steps, ckpt = cfg.checkpoints.every_steps, self.ckpt
        assert ckpt is not None
        model, engine = parts.wrapped, parts.ds_engine
        model.train()
        autocast = M.autocast(self.precision, dist.device, parts)
        pad_id = self.data.tokenizer.pad_token_id
        thr = Throughput()
        ckpt.last_time = time.monotonic()
        self.set_phase("training", step=st.global_step)
        logs.rank0("training_start", step=st.global_step, total_steps=total_steps, epoch=st.epoch)
        if st.global_step >= total_steps:  # e.g. a retry after a failed export: nothing to retrain
            logs.rank0("export_only", step=st.global_step, total_steps=total_steps)
        self.goodput.training_starts()
        first_step = st.global_step

        while st.global_step < total_steps:
            t_step = time.monotonic()
            mpe = batches.micro_per_epoch
            micro_ids = list(range(st.micro_in_epoch, min(st.micro_in_epoch + ga, mpe)))
            mbs = [batches.micro_batch(st.epoch, m, rank) for m in micro_ids]
            local_items = sum(s.trained_tokens for mb in mbs for s in mb)
            n_items = max(1.0, dist.all_reduce([float(local_items)])[0])
            rng = S.rng_state(dist.cuda)  # where this step began, to drop it cleanly on a stop
            done = step.accumulate(mbs, parts, dist, autocast, n_items, pad_id, self.stop)
            if done is None:  # stopped before a micro-batch: drop the partial step, save the last whole one
                step.drop_partial_step(parts, rng, dist.cuda)
                if st.global_step == first_step:
                    raise Preempted()  # nothing trained in this attempt: the last checkpoint stands
                return self._preempt()
            loss_sum, tokens, samples = done.loss_sum, done.tokens, done.samples
            if engine is None:
                step.optimizer_step(parts, t.max_grad_norm)
            st.micro_in_epoch = micro_ids[-1] + 1
            if st.micro_in_epoch >= mpe:
                st.epoch += 1
                st.micro_in_epoch = 0
            st.sequences_in_epoch = st.micro_in_epoch * batches.global_micro
            st.global_step += 1
            for hook in self.step_hooks:
                hook(st)

            due = 1.0 if ckpt.due_by_time() else 0.0
            g = dist.all_reduce([loss_sum, float(tokens), float(samples), 1.0 if self.stop else 0.0, due])
            step_loss = g[0] / n_items
            st.last_loss = step_loss
            st.tokens_seen += int(g[1])
            st.samples_seen += int(g[2])
            thr.tokens += int(g[1])
            thr.samples += int(g[2])
            thr.steps += 1
            self.goodput.step_done(st.global_step, time.monotonic() - t_step)
            st.highest_step = max(st.highest_step, st.global_step)
            self._after_step(step_loss, int(g[1]), thr)

            if g[3] > 0:  # some rank was told to stop: save now, before any evaluation that fell due
                return self._preempt()
            if t.eval_steps and self.data.eval_seqs and st.global_step % t.eval_steps == 0:
                self._evaluate()
                model.train()
            if (every_steps and st.global_step % every_steps == 0) or g[4] > 0:
                if st.global_step < total_steps:
                    self._save_checkpoint("interval")
            ckpt.raise_if_uploads_keep_failing()
        logs.rank0("training_done", step=st.global_step, loss=st.last_loss, tokens_seen=st.tokens_seen)
        return ExitCode.SUCCESS

    def _after_step(self, loss: float, tokens: int, thr: Any) -> None:
        st, t, total_steps = self.state, self.cfg.training, self.data.total_steps
        lr = float(self.parts.scheduler.get_last_lr()[0])
        tps, sps, steps_ps = thr.rates()
        util = None if self.mfu_meter is None else self.mfu_meter.ratio(tps)
        self.metrics.safe(lambda: self.metrics.record_step(st.global_step, loss, lr, tps, sps, tokens, util))
        self.progress.update(
            phase="training",
            step=st.global_step,
            loss=loss,
            learning_rate=lr,
            tokens_per_second=round(tps, 3),
            tokens_seen=st.tokens_seen,
            epoch=round(st.epoch + st.micro_in_epoch / self.data.batches.micro_per_epoch, 4),
            steps_per_second=round(steps_ps, 6),
            mfu=None if util is None else round(util, 4),
            **self.goodput.progress_fields(),
        )
        if st.global_step % t.logging_steps == 0 or st.global_step == total_steps or st.global_step == 1:
            logs.rank0(
                "step",
                step=st.global_step,
                total_steps=total_steps,
                loss=round(loss, 6),
                loss_exact=loss,
                learning_rate=lr,
                epoch=st.epoch,
                tokens_per_second=round(tps, 1),
                samples_per_second=round(sps, 2),
                tokens_seen=st.tokens_seen,
            )
            thr.reset()  # rates over the last logging window

    def _preempt(self) -> ExitCode:
        st = self.state
        logs.rank0("preempting", step=st.global_step, signal=self.stop.signal)
        st.gpu_seconds, st.elapsed_seconds = self.gpu_seconds(), self.progress.elapsed()
        assert self.ckpt is not None
        self.ckpt.make_durable(st, self.parts)
        self.progress.update(
            force=True,
            phase="checkpointing",
            step=st.global_step,
            message=f"preempted ({self.stop.signal}); checkpoint at step {st.global_step} is durable",
        )
        logs.rank0("preempted", step=st.global_step, exit_code=int(ExitCode.PREEMPTED))
        return ExitCode.PREEMPTED

    # -- evaluation, export
    def _evaluate(self) -> float | None:
        from . import model as M

        d, st = self.data, self.state
        if not d.eval_seqs:
            return None
        loss = M.eval_loss(
            self.parts,
            d.eval_seqs,
            dist=self.dist,
            batch_size=self.cfg.training.batch_size,
            precision=self.precision,
            pad_id=d.tokenizer.pad_token_id,
        )
        st.last_eval_loss, self._eval_step = loss, st.global_step
        if loss is not None:
            self.metrics.safe(lambda: self.metrics.eval_loss.set(loss))
            self.progress.update(eval_loss=loss)
            logs.rank0("eval", step=st.global_step, eval_loss=round(loss, 6), sequences=len(d.eval_seqs))
        return loss

    def _facts(self) -> Any:
        from .export import RunFacts

        d = self.data
        return RunFacts(
            state=self.state,
            precision=self.precision.name,
            world_size=self.dist.env.world,
            dataset_sha256=d.dataset_sha256,
            records=d.report.records,
            bad_records=d.report.bad_count,
            train_sequences=len(d.train_seqs),
            eval_sequences=len(d.eval_seqs),
            wall_time_seconds=self.progress.elapsed(),
            gpu_seconds=self.gpu_seconds(),
            resumed_from_step=self.resumed_from,
            attempt=self.opts.attempt,
            goodput=self.goodput,
            job_cost=self.opts.job_cost,
        )

    def _export(self) -> ExitCode:
        from .export import export_output

        st = self.state
        self.set_phase("uploading", step=st.global_step)
        uri = export_output(
            self.cfg,
            self.parts,
            self.data.tokenizer,
            self.data.model_src,
            self._facts,
            rank0=self.rank0,
            out_dir=self.work / "output",
            client=self.client(),
            fence=self.ckpt.fence.check if self.ckpt is not None and self.ckpt.fence is not None else None,
            checkpoint=self.ckpt.store.last_durable() if self.ckpt is not None else None,
        )
        if self.rank0:
            if self.ckpt is not None:
                self.ckpt.wait()
            summary: dict[str, Any] = dict(
                step=st.global_step, loss=st.last_loss, eval_loss=st.last_eval_loss, tokens_seen=st.tokens_seen
            )
            self.progress.update(force=True, phase="done", output_uri=uri, **summary)
            logs.log("done", output_uri=uri, **summary, elapsed_seconds=round(self.progress.elapsed(), 2))
        self.dist.barrier()
        return ExitCode.SUCCESS


def run(
    cfg: TrainerConfig,
    opts: TrainerOptions | None = None,
    stop: StopFlag | None = None,
    step_hooks: Iterable[StepHook] = (),
) -> ExitCode:
    """Train one attempt of the job; raises KubetuneError subclasses for the exit codes.

    opts=None reads the options from this process's environment now (in-process callers such as
    tests); the entry point passes the options it read. With stop=None SIGTERM/SIGINT handlers
    are installed for the run and removed after it; a caller that passes a StopFlag owns it.
    """
    if opts is None:
        opts = TrainerOptions.from_environ(os.environ)
    hooks = list(step_hooks)
    delay = opts.step_delay_seconds
    if delay:  # test/demo only: slow steps down so a preemption can be injected mid-run
        hooks.append(lambda _state: time.sleep(delay))
    return Run(cfg, opts, stop, hooks).run()
