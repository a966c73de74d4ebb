"""Where a stop (SIGTERM) is honoured inside the step loop, through the real trainer in-process on
a real S3 server: before every micro-batch of a gradient-accumulation step (the partial step is
dropped and the run resumes exactly, as if the step had never begun) and before an evaluation
that falls due at the same step (the checkpoint is made durable first; evaluating could eat the
grace period)."""

import json

import pytest

from kubetune_contract.config import TrainerConfig
from kubetune_contract.progress import ExitCode, ProgressRecord
from kubetune_dev.tiny_model import instruction_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config
from kubetune_trainer import model as M
from kubetune_trainer.options import TrainerOptions
from kubetune_trainer.signals import StopFlag
from kubetune_trainer.train import run
from tests.fixtures.tiny_model import tiny_model_dir  # noqa: F401

pytestmark = pytest.mark.s3

TOTAL, GA = 8, 3


def _cfg(minio, bucket, model_dir, data, name, **training):
    return TrainerConfig.model_validate(
        trainer_config(
            bucket=bucket,
            endpoint=minio.endpoint,
            model_dir=model_dir,
            data_uri=str(data),
            name=name,
            lora={"dropout": 0.1},  # dropout draws random numbers: a dropped step must give them back
            dataset={"validationSplit": 0.2},
            training={"maxSteps": TOTAL, "batchSize": 2, "gradientAccumulationSteps": GA, **training},
            checkpoints={"everySteps": 100},
        )
    )


def _run(tmp_path, capsys, cfg, name, stop=None, hooks=()):
    opts = TrainerOptions(
        work_dir=tmp_path / f"work-{name}", metrics_port=None, termination_log=str(tmp_path / f"term-{name}")
    )
    rc = run(cfg, opts, stop=stop if stop is not None else StopFlag(), step_hooks=hooks)
    out = capsys.readouterr().out
    evs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rc, evs, ProgressRecord.model_validate_json((tmp_path / f"term-{name}").read_text())


def _losses(evs):
    return {e["step"]: e["loss_exact"] for e in evs if e.get("event") == "step"}


@pytest.fixture
def env(tmp_path, minio, monkeypatch):
    for k, v in minio.env().items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    return minio.make_bucket(), write_jsonl(tmp_path / "train.jsonl", instruction_records(80, seed=3))


def test_a_stop_between_micro_batches_drops_the_partial_step_and_resume_is_exact(
    tmp_path, capsys, minio, tiny_model_dir, env, monkeypatch
):
    bucket, data = env
    rc, ref, _ = _run(tmp_path, capsys, _cfg(minio, bucket, tiny_model_dir, data, "ref"), "ref")
    assert rc == ExitCode.SUCCESS
    reference = _losses(ref)
    assert sorted(reference) == list(range(1, TOTAL + 1))

    # SIGTERM arrives during the first micro-batch of step 4 (3 whole steps done, GA micro-batches each).
    stop, done, forwards, original = StopFlag(), [0], [], M.forward

    def forward(*args, **kwargs):
        import torch

        out = original(*args, **kwargs)
        if torch.is_grad_enabled() and done[0] == 3:
            forwards.append(1)
            stop.set("SIGTERM")
        return out

    def count(st):
        done[0] = st.global_step

    monkeypatch.setattr(M, "forward", forward)
    cfg = _cfg(minio, bucket, tiny_model_dir, data, "pre")
    rc, pre, rec = _run(tmp_path, capsys, cfg, "pre-1", stop=stop, hooks=[count])
    monkeypatch.setattr(M, "forward", original)
    assert rc == ExitCode.PREEMPTED
    assert len(forwards) == 1  # the other micro-batches of step 4 never ran
    assert sorted(_losses(pre)) == [1, 2, 3]
    assert next(e for e in pre if e.get("event") == "preempted")["step"] == 3
    assert rec.last_checkpoint.step == 3

    rc, res, _ = _run(tmp_path, capsys, cfg, "pre-2")
    assert rc == ExitCode.SUCCESS
    assert next(e for e in res if e.get("event") == "resumed")["step"] == 3
    after = _losses(res)
    assert sorted(after) == list(range(4, TOTAL + 1))
    for s in after:  # step 4 as if it had never begun: same data, same dropout draws
        assert after[s] == pytest.approx(reference[s], rel=1e-6, abs=1e-7), s


def test_a_stop_at_a_step_where_evaluation_falls_due_saves_before_evaluating(
    tmp_path, capsys, minio, tiny_model_dir, env
):
    bucket, data = env
    stop = StopFlag()

    def at_step_2(st):
        if st.global_step == 2:
            stop.set("SIGTERM")  # during step 2, whose end is also when evaluation is due

    cfg = _cfg(minio, bucket, tiny_model_dir, data, "ev", evalSteps=2)
    rc, evs, rec = _run(tmp_path, capsys, cfg, "ev", stop=stop, hooks=[at_step_2])
    assert rc == ExitCode.PREEMPTED
    assert rec.last_checkpoint.step == 2
    assert not [e for e in evs if e.get("event") == "eval"]  # the grace period went to the checkpoint
