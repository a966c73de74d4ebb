"""The trainer end to end, in-process, against a real MinIO: learning, output, fail-fast exits."""

import json
import time

import pytest

from kubetune_contract.progress import ExitCode, ProgressRecord
from kubetune_dev.tiny_model import instruction_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config
from kubetune_trainer.__main__ import main
from tests.fixtures.tiny_model import events

pytestmark = pytest.mark.s3


def _run(tmp_path, monkeypatch, cfg, creds, capsys):
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    p = tmp_path / "trainer-config.json"
    p.write_text(json.dumps(cfg))
    monkeypatch.setenv("KUBETUNE_CONFIG", str(p))
    monkeypatch.setenv("KUBETUNE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    t0 = time.monotonic()
    rc = main([])
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out
    (tmp_path / "stdout.log").write_text(out)
    term = tmp_path / "termination-log"
    rec = ProgressRecord.model_validate_json(term.read_text()) if term.exists() else None
    return rc, elapsed, tmp_path / "stdout.log", rec


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "data" / "train.jsonl", instruction_records(160, seed=1))


def test_lora_learns_and_publishes_adapter_with_model_card(
    tmp_path, monkeypatch, capsys, minio, tiny_model_dir, data_file
):
    bucket = minio.make_bucket()
    cfg = trainer_config(
        bucket=bucket,
        endpoint=minio.endpoint,
        model_dir=tiny_model_dir,
        data_uri=str(data_file),
        name="learn",
        training={
            "maxSteps": 30,
            "learningRate": 0.01,
            "loggingSteps": 5,
            "lrScheduler": "cosine",
            "warmupRatio": 0.1,
            "gradientCheckpointing": "always",
        },
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
        dataset={"validationSplit": 0.1},
        checkpoints={"everySteps": 10},
        output={"mergeWeights": True},
    )
    rc, _, log, rec = _run(tmp_path, monkeypatch, cfg, minio.env(), capsys)
    assert rc == ExitCode.SUCCESS, log.read_text()[-3000:]
    steps = events(log, "step")
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert steps[-1]["step"] == 30
    assert last < 0.5 * first, (first, last)
    assert all(e["rank"] == 0 for e in events(log))
    # progress/termination record
    assert rec.phase == "done" and rec.step == 30 and rec.output_uri.endswith(f"{bucket}/output/ns/learn/uid-learn")
    assert rec.eval_loss is not None and rec.tokens_seen > 0
    assert rec.last_checkpoint.step == 30  # the last step, durable before the export
    # the output: adapter + tokenizer + model card
    c = minio.client()
    keys = {o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="output/ns/learn/uid-learn/")["Contents"]}
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "model_card.json",
        "merged/model.safetensors",
        "merged/config.json",
    ):
        assert f"output/ns/learn/uid-learn/{name}" in keys
    card = json.loads(c.get_object(Bucket=bucket, Key="output/ns/learn/uid-learn/model_card.json")["Body"].read())
    import hashlib

    assert card["dataset"]["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert card["method"] == "lora" and card["steps"] == 30 and card["base_model"]["uri"] == str(tiny_model_dir)
    assert card["hyperparameters"]["lora"]["r"] == 16 and card["hyperparameters"]["training"]["maxSteps"] == 30
    assert card["tokens_seen"] == rec.tokens_seen and card["final_train_loss"] == pytest.approx(last, rel=1e-4)
    assert card["final_eval_loss"] == pytest.approx(rec.eval_loss) and card["gpu_hours"] == 0
    assert card["wall_time_seconds"] > 0
    # the output loads back as a peft adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dl = tmp_path / "dl"
    dl.mkdir()
    for k in keys:
        if k.count("/") == 4:  # output/ns/<name>/<uid>/<file>: the adapter, not merged/
            c.download_file(bucket, k, str(dl / k.rsplit("/", 1)[1]))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(dl))
    # no progress bars, only JSON lines on stdout
    assert "\r" not in log.read_text()
    assert all(line.startswith("{") for line in log.read_text().splitlines() if line.strip())


def test_full_fine_tuning_writes_the_whole_model_and_checkpoints_by_time(
    tmp_path, monkeypatch, capsys, minio, tiny_model_dir, data_file
):
    """method=full writes the whole model (mergeWeights is a no-op for it); everyMinutes alone
    triggers checkpoints (rank 0's clock)."""
    bucket = minio.make_bucket()
    cfg = trainer_config(
        bucket=bucket,
        endpoint=minio.endpoint,
        model_dir=tiny_model_dir,
        data_uri=str(data_file),
        name="full",
        method="full",
        training={"maxSteps": 3, "learningRate": 1e-3},
        checkpoints={"everySteps": None, "everyMinutes": 0.002},  # 0.12 s
        output={"mergeWeights": True},
    )
    monkeypatch.setenv("KUBETUNE_STEP_DELAY_SECONDS", "0.2")
    rc, _, log, rec = _run(tmp_path, monkeypatch, cfg, minio.env(), capsys)
    assert rc == 0, log.read_text()[-3000:]
    # due after every step but the last (the final state goes to the output instead)
    assert [(e["step"], e["reason"]) for e in events(log, "checkpoint_saved_locally")] == [
        (1, "interval"),
        (2, "interval"),
        (3, "final"),  # the last step is durable before the export
    ]
    keys = {o["Key"] for o in minio.client().list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"]}
    assert "output/ns/full/uid-full/model.safetensors" in keys and "output/ns/full/uid-full/config.json" in keys


def test_bad_credentials_fail_fast_with_exit_2(tmp_path, monkeypatch, capsys, minio, tiny_model_dir, data_file):
    bucket = minio.make_bucket()
    cfg = trainer_config(bucket=bucket, endpoint=minio.endpoint, model_dir=tiny_model_dir, data_uri=str(data_file))
    creds = {"AWS_ACCESS_KEY_ID": "nobody-knows-me", "AWS_SECRET_ACCESS_KEY": "wrong-secret-key"}
    rc, elapsed, log, rec = _run(tmp_path, monkeypatch, cfg, creds, capsys)
    assert rc == ExitCode.USER_ERROR
    assert elapsed < 30
    assert rec.phase == "failed" and "access key" in rec.message and "checkpoints.uri" in rec.message
    failed = events(log, "failed")[0]
    assert failed["exit_code"] == 2 and failed["error_type"] == "UserError"
    # no model was loaded: it failed before any expensive step
    assert not events(log, "model_loaded")


def test_missing_bucket_fails_fast_with_exit_2(tmp_path, monkeypatch, capsys, minio, tiny_model_dir, data_file):
    cfg = trainer_config(
        bucket="no-such-bucket-here", endpoint=minio.endpoint, model_dir=tiny_model_dir, data_uri=str(data_file)
    )
    rc, elapsed, log, rec = _run(tmp_path, monkeypatch, cfg, minio.env(), capsys)
    assert rc == ExitCode.USER_ERROR and elapsed < 30
    assert "no-such-bucket-here" in rec.message and "does not exist" in rec.message


def test_bad_dataset_is_reported_by_line_and_stops_before_training(
    tmp_path, monkeypatch, capsys, minio, tiny_model_dir
):
    bucket = minio.make_bucket()
    recs = [json.dumps(r) for r in instruction_records(8)]
    recs[2] = '{"prompt": "broken'
    recs[5] = json.dumps({"prompt": "count from one"})
    # the data lives in S3 this time
    body = ("\n".join(recs) + "\n").encode()
    minio.client().put_object(Bucket=bucket, Key="data/train.jsonl", Body=body)
    cfg = trainer_config(
        bucket=bucket,
        endpoint=minio.endpoint,
        model_dir=tiny_model_dir,
        data_uri=f"s3://{bucket}/data/",
        dataset={"maxBadRecordFraction": 0.1},
    )
    rc, _, log, rec = _run(tmp_path, monkeypatch, cfg, minio.env(), capsys)
    assert rc == ExitCode.USER_ERROR
    bad = [(e["file"], e["line"], e["reason"]) for e in events(log, "bad_record")]
    src = f"s3://{bucket}/data/train.jsonl"
    assert [(f, n) for f, n, _ in bad] == [(src, 3), (src, 6)]
    assert bad[1][2] == "missing field 'response'"
    assert f"{src}:3: bad JSON" in rec.message and "2 of 8 records" in rec.message
    pre = events(log, "preflight")[0]
    assert pre["records"] == 8 and pre["bad_records"] == 2 and pre["tokens"]["count"] == 6
    assert not events(log, "training_start")


def test_invalid_config_names_the_field(tmp_path, monkeypatch, capsys, minio, tiny_model_dir, data_file):
    cfg = trainer_config(
        bucket="b-x",
        endpoint=minio.endpoint,
        model_dir=tiny_model_dir,
        data_uri=str(data_file),
        training={"maxSteps": 0},
    )
    rc, _, log, rec = _run(tmp_path, monkeypatch, cfg, minio.env(), capsys)
    assert rc == ExitCode.USER_ERROR
    assert "training.maxSteps" in rec.message and rec.phase == "failed"


def test_sigterm_before_training_exits_preempted_without_saving(
    tmp_path, minio, tiny_model_dir, data_file, monkeypatch
):
    from kubetune_contract.config import TrainerConfig
    from kubetune_trainer.options import TrainerOptions
    from kubetune_trainer.signals import StopFlag
    from kubetune_trainer.train import run

    bucket = minio.make_bucket()
    for k, v in minio.env().items():
        monkeypatch.setenv(k, v)
    cfg = TrainerConfig.model_validate(
        trainer_config(bucket=bucket, endpoint=minio.endpoint, model_dir=tiny_model_dir, data_uri=str(data_file))
    )
    stop = StopFlag()
    stop.set("SIGTERM")  # arrived while the pod was starting
    opts = TrainerOptions(
        work_dir=tmp_path / "work", metrics_port=None, termination_log=str(tmp_path / "termination-log")
    )
    assert run(cfg, opts, stop=stop) == ExitCode.PREEMPTED  # a caller's own StopFlag: no signal handlers
    assert "Contents" not in minio.client().list_objects_v2(Bucket=bucket, Prefix="checkpoints/")
    rec = ProgressRecord.model_validate_json((tmp_path / "termination-log").read_text())
    assert "preempted before training" in rec.message
