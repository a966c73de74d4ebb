"""`python -m kubetune_trainer size` (the sizing pod's entry point) against a real MinIO: the tiny
model's config.json and the dataset read from S3 with the job's credentials, the SizingRecord on
stdout and in the termination message, the weights never downloaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_contract.estimate import ModelArch
from kubetune_contract.progress import ExitCode
from kubetune_contract.sizing import SizingRecord, config_facts
from kubetune_dev.tiny_model import instruction_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config, trainer_env
from kubetune_dev.versions import REPO
from kubetune_trainer import s3

pytestmark = pytest.mark.s3


def size(tmp_path: Path, cfg: dict, s3_env: dict) -> tuple[int, SizingRecord, Path]:
    env = trainer_env(tmp_path / "run", cfg, s3_env)
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "size"],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{") and '"phase"' in ln]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = SizingRecord.model_validate_json(lines[-1])
    termination = Path(env["KUBETUNE_TERMINATION_LOG"]).read_text()
    assert SizingRecord.model_validate_json(termination) == record
    return proc.returncode, record, Path(env["KUBETUNE_WORK_DIR"])


@pytest.fixture
def uploaded(tmp_path, minio, tiny_model_dir):
    """A bucket holding the tiny model and 40 instruction records."""
    bucket = minio.make_bucket()
    client = minio.client()
    s3.upload_dir(client, tiny_model_dir, f"s3://{bucket}/models/tiny")
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(40, seed=3))
    s3.upload_file(client, data, f"s3://{bucket}/datasets/train.jsonl")
    return bucket


def test_size_reads_config_json_from_s3_and_reports_the_estimators_keys(tmp_path, minio, tiny_model_dir, uploaded):
    cfg = trainer_config(
        bucket=uploaded,
        endpoint=minio.endpoint,
        model_dir=f"s3://{uploaded}/models/tiny",
        data_uri=f"s3://{uploaded}/datasets/train.jsonl",
    )
    code, record, _ = size(tmp_path, cfg, minio.env())
    assert code == ExitCode.SUCCESS and record.phase == "done"
    expected = config_facts(json.loads((tiny_model_dir / "config.json").read_text()))
    assert record.model_facts == expected and record.model_facts["hidden_size"] == 64
    assert ModelArch.from_config(record.model_facts).layers == 2  # what the operator will estimate from
    assert record.dataset is None  # maxSteps given: the dataset is not needed


def test_size_counts_an_epochs_jobs_dataset_without_downloading_weights(tmp_path, minio, uploaded):
    cfg = trainer_config(
        bucket=uploaded,
        endpoint=minio.endpoint,
        model_dir=f"s3://{uploaded}/models/tiny",
        data_uri=f"s3://{uploaded}/datasets/train.jsonl",
        training={"maxSteps": None, "epochs": 2, "packing": False},
        dataset={"validationSplit": 0.1},
    )
    code, record, work = size(tmp_path, cfg, minio.env())
    assert code == ExitCode.SUCCESS and record.dataset is not None
    ds = record.dataset
    assert (ds.records, ds.sampled_records, ds.counted) == (40, 40, "all")
    assert ds.sequences == 36  # unpacked: one per example, 10% held out for validation
    assert 0 < ds.tokens <= 36 * 64  # truncated to maxSeqLength
    fetched = [p.name for p in work.rglob("*") if p.is_file()]
    assert "tokenizer_config.json" in fetched or "tokenizer.json" in fetched
    assert not [n for n in fetched if n.endswith((".safetensors", ".bin"))], fetched


def test_a_missing_config_json_is_a_user_error_naming_the_field(tmp_path, minio, uploaded):
    cfg = trainer_config(
        bucket=uploaded,
        endpoint=minio.endpoint,
        model_dir=f"s3://{uploaded}/models/nothing-here",
        data_uri=f"s3://{uploaded}/datasets/train.jsonl",
    )
    code, record, _ = size(tmp_path, cfg, minio.env())
    assert code == ExitCode.USER_ERROR and record.phase == "failed"
    assert record.message and "models/nothing-here/config.json" in record.message


def test_wrong_credentials_are_a_user_error(tmp_path, minio, uploaded):
    cfg = trainer_config(
        bucket=uploaded,
        endpoint=minio.endpoint,
        model_dir=f"s3://{uploaded}/models/tiny",
        data_uri=f"s3://{uploaded}/datasets/train.jsonl",
    )
    bad = {"AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    code, record, _ = size(tmp_path, cfg, bad)
    assert code == ExitCode.USER_ERROR and record.message and "AWS_ACCESS_KEY_ID" in record.message
