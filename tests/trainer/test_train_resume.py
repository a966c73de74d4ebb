"""Preemption and exact resume, through the real trainer process and a real MinIO.

A reference run trains 16 steps uninterrupted. A second run of the same config is sent SIGTERM
mid-run: it finishes the step, checkpoints, waits for the upload and exits 3. Restarted, it
resumes at that step and its losses equal the reference's. A copy of the preempted job whose
newest checkpoint is corrupted falls back to the previous checkpoint, and its losses equal the
reference's as well.
"""

import signal

import pytest

from kubetune_contract.progress import ExitCode, ProgressRecord
from kubetune_dev.tiny_model import instruction_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config, trainer_env
from tests.fixtures.tiny_model import events, start_trainer, step_losses, wait_for_event

pytestmark = pytest.mark.s3

TOTAL = 16


def _keys(client, bucket, prefix):
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def _committed_steps(client, bucket, job):
    return sorted(
        int(k.split("/")[-2].split("-")[1])
        for k in _keys(client, bucket, f"checkpoints/ns/{job}/uid-{job}/")
        if k.endswith("MANIFEST.json")
    )


def test_sigterm_checkpoint_exact_resume_and_fallback(tmp_path, minio, tiny_model_dir):
    bucket = minio.make_bucket()
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(60, seed=2))

    def cfg(name, **ck):
        return trainer_config(
            bucket=bucket,
            endpoint=minio.endpoint,
            model_dir=tiny_model_dir,
            data_uri=str(data),
            name=name,
            lora={"dropout": 0.1},  # dropout: the RNG state must resume too
            training={
                "maxSteps": TOTAL,
                "batchSize": 2,
                "gradientAccumulationSteps": 2,
                "lrScheduler": "cosine",
                "warmupRatio": 0.1,
                "learningRate": 0.01,
            },
            checkpoints={"everySteps": 4, "keepLast": 3, **ck},
        )

    def env(name, run, ck=None, **extra):
        return trainer_env(tmp_path / f"{name}-{run}", cfg(name, **(ck or {})), minio.env(), **extra)

    # reference (uninterrupted) and the run to preempt, side by side
    ref_log, pre_log = tmp_path / "ref.log", tmp_path / "pre-1.log"
    ref = start_trainer(env("ref", 1), ref_log)
    pre = start_trainer(env("pre", 1, KUBETUNE_STEP_DELAY_SECONDS=0.4), pre_log)
    wait_for_event(pre, pre_log, lambda e: e.get("event") == "step" and e["step"] >= 5)
    pre.send_signal(signal.SIGTERM)
    assert pre.wait(120) == ExitCode.PREEMPTED, pre_log.read_text()[-4000:]
    assert ref.wait(180) == ExitCode.SUCCESS, ref_log.read_text()[-4000:]

    stopped = events(pre_log, "preempted")[0]["step"]
    assert 5 <= stopped < TOTAL
    assert [e["reason"] for e in events(pre_log, "checkpoint_saved_locally")][-1] == "sigterm"
    assert events(pre_log, "checkpoint_durable")[-1]["step"] == stopped
    rec = ProgressRecord.model_validate_json((tmp_path / "pre-1" / "termination-log").read_text())
    assert rec.last_checkpoint.step == stopped and "preempted" in rec.message
    client = minio.client()
    steps = _committed_steps(client, bucket, "pre")
    assert steps[-1] == stopped and 4 in steps

    reference = step_losses(ref_log)
    assert sorted(reference) == list(range(1, TOTAL + 1))
    before = step_losses(pre_log)
    for s in range(1, stopped + 1):
        assert before[s] == pytest.approx(reference[s], rel=1e-6, abs=1e-7)

    # a copy of the preempted job whose newest checkpoint was corrupted after upload, resumed by
    # another job (another UID) that names it in checkpoints.resumeFrom
    for k in _keys(client, bucket, "checkpoints/ns/pre/uid-pre/"):
        copy = k.replace("/ns/pre/", "/ns/copy/")
        client.copy_object(Bucket=bucket, Key=copy, CopySource={"Bucket": bucket, "Key": k})
    victim = f"checkpoints/ns/copy/uid-pre/checkpoints/step-{stopped:09d}-a0/trainable.safetensors"
    blob = bytearray(client.get_object(Bucket=bucket, Key=victim)["Body"].read())
    blob[-16:] = bytes(16)  # same size, different bytes: only the sha256 can tell
    client.put_object(Bucket=bucket, Key=victim, Body=bytes(blob))
    previous = max(s for s in steps if s < stopped)

    res_log, fb_log = tmp_path / "pre-2.log", tmp_path / "fb.log"
    res = start_trainer(env("pre", 2), res_log)
    fb = start_trainer(env("fb", 1, {"resumeFrom": f"s3://{bucket}/checkpoints/ns/copy/uid-pre"}), fb_log)
    assert res.wait(180) == ExitCode.SUCCESS, res_log.read_text()[-4000:]
    assert fb.wait(180) == ExitCode.SUCCESS, fb_log.read_text()[-4000:]

    assert events(res_log, "resumed")[0]["step"] == stopped
    after = step_losses(res_log)
    assert sorted(after) == list(range(stopped + 1, TOTAL + 1))
    for s in after:
        assert after[s] == pytest.approx(reference[s], rel=1e-6, abs=1e-7), s

    assert events(fb_log, "resumed")[0]["step"] == previous
    skipped = [e for e in events(fb_log, "log") if "checkpoint skipped" in e.get("message", "")]
    assert skipped and f"step={stopped}" in skipped[0]["message"]
    fb_losses = step_losses(fb_log)
    assert sorted(fb_losses) == list(range(previous + 1, TOTAL + 1))
    for s in fb_losses:
        assert fb_losses[s] == pytest.approx(reference[s], rel=1e-6, abs=1e-7), s
    # the finished runs' outputs are there
    assert "output/ns/pre/uid-pre/model_card.json" in _keys(client, bucket, "output/ns/pre/uid-pre/")
