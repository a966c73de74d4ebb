"""Goodput facts and MFU on a real trainer's /metrics (real MinIO, the real promtool): a run
killed with SIGKILL between checkpoints, resumed from the older checkpoint, recomputes the steps
it had trained after it — the trainer counts them, from the high-water mark it left in S3."""

import json
import signal
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_contract import envvars
from kubetune_contract.jobcost import GoodputSeconds, JobCostSoFar
from kubetune_contract.progress import ExitCode, ProgressRecord
from kubetune_dev.prometheus import promtool_check_metrics
from kubetune_dev.tiny_model import instruction_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config, trainer_env
from tests.fixtures.tiny_model import events, start_trainer, wait_for_event

pytestmark = pytest.mark.s3

TOTAL = 14
PRIOR = JobCostSoFar(  # what the operator would say of attempt 1 after a preemption
    attempt=1,
    workers=1,
    after_preemption=True,
    usd_per_worker_hour=3.6,
    worker_seconds=100.0,
    estimated_usd=0.1,
    tokens=10,
    goodput=GoodputSeconds(
        productive_seconds=50.0, startup_seconds=10.0, checkpoint_blocked_seconds=1.0, pending_seconds=4.0
    ),
)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def values(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def scrape_until(proc, log, pred, timeout=120.0) -> tuple[str, dict[str, float]]:
    port = wait_for_event(proc, log, lambda e: e.get("event") == "metrics_server_started")["port"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        text = scrape(port)
        v = values(text)
        if pred(v):
            return text, v
        time.sleep(0.1)
    raise AssertionError(f"timed out; last scrape {v}")


def highwater(client, bucket) -> int:
    try:
        body = client.get_object(Bucket=bucket, Key="checkpoints/ns/gp/uid-gp/highest-step.json")["Body"].read()
    except client.exceptions.NoSuchKey:
        return 0
    return json.loads(body)["step"]


def test_goodput_facts_across_a_kill_and_resume(tmp_path, minio, tiny_model_dir):
    bucket, client = minio.make_bucket(), minio.client()
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(60, seed=3))
    cfg = trainer_config(
        bucket=bucket,
        endpoint=minio.endpoint,
        model_dir=tiny_model_dir,
        data_uri=str(data),
        name="gp",
        training={"maxSteps": TOTAL, "batchSize": 2},
        checkpoints={"everySteps": 4, "keepLast": 3},
        progressIntervalSeconds=0.1,
    )

    # attempt 1: slow steps; killed (no SIGTERM, no last checkpoint) once S3 knows step >= 6
    log1 = tmp_path / "a1.log"
    t0 = time.monotonic()
    a1 = start_trainer(trainer_env(tmp_path / "a1", cfg, minio.env(), KUBETUNE_STEP_DELAY_SECONDS=0.3), log1)
    text, v = scrape_until(a1, log1, lambda v: v.get("kubetune_trainer_step", 0) >= 3)
    elapsed = time.monotonic() - t0
    code, complaints = promtool_check_metrics(text)
    assert code == 0 and complaints.strip() == "", complaints
    assert 0 < v["kubetune_trainer_productive_seconds_total"] <= elapsed
    assert v["kubetune_trainer_recomputed_steps_total"] == 0
    assert 0 < v["kubetune_trainer_startup_seconds"] < elapsed
    assert v["kubetune_trainer_step_seconds_count"] >= 3
    assert v["kubetune_trainer_step_seconds_sum"] >= 0.3 * 3  # the step delay is inside the step
    assert v["kubetune_trainer_model_flops_per_token"] > 0
    assert "kubetune_trainer_mfu_ratio" not in text and "kubetune_trainer_gpu" not in text  # CPU: absent
    deadline = time.monotonic() + 60
    while highwater(client, bucket) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    a1.send_signal(signal.SIGKILL)
    a1.wait(30)
    reached = highwater(client, bucket)
    durable = max(e["step"] for e in events(log1, "checkpoint_durable"))
    assert durable < reached, (durable, reached)

    # attempt 2: resumes from the older checkpoint and trains to the end; the operator told it
    # the first attempt's totals (KUBETUNE_JOB_COST), for the model card
    log2 = tmp_path / "a2.log"
    env2 = trainer_env(tmp_path / "a2", cfg, minio.env(), KUBETUNE_STEP_DELAY_SECONDS=0.1)
    env2[envvars.JOB_COST] = PRIOR.model_dump_json(by_alias=True)
    a2 = start_trainer(env2, log2)
    text, v = scrape_until(a2, log2, lambda v: v.get("kubetune_trainer_step", 0) >= reached + 1)
    assert events(log2, "resumed")[0]["step"] == durable
    assert v["kubetune_trainer_recomputed_steps_total"] == reached - durable
    assert v["kubetune_trainer_step_seconds_count"] == v["kubetune_trainer_step"] - durable
    assert a2.wait(120) == ExitCode.SUCCESS, log2.read_text()[-4000:]
    rec = ProgressRecord.model_validate_json((tmp_path / "a2" / "termination-log").read_text())
    assert rec.recomputed_steps == reached - durable
    assert rec.productive_seconds and 0 < rec.productive_seconds <= rec.elapsed_seconds
    assert rec.startup_seconds and rec.startup_seconds > 0
    assert rec.checkpoint_blocked_seconds and rec.checkpoint_blocked_seconds > 0  # step 8 and 12 were saved
    assert rec.mfu is None
    assert rec.recomputed_seconds and rec.recomputed_seconds >= 0.1 * (reached - durable)  # (the step delay)
    assert highwater(client, bucket) == TOTAL

    # The model card: the job's goodput and cost as of the export, the earlier attempt's included.
    card = json.loads(client.get_object(Bucket=bucket, Key="output/ns/gp/uid-gp/model_card.json")["Body"].read())
    g, cost = card["goodput"], card["cost"]
    assert g["as_of"] == cost["as_of"] == "export" and cost["attempts"] == 2
    assert g["productive_seconds"] == pytest.approx(50 + rec.productive_seconds, abs=0.01)
    assert g["startup_seconds"] == 10  # this attempt followed a preemption: its start-up is lost, below
    assert g["lost_to_preemption_seconds"] == pytest.approx(rec.startup_seconds + rec.recomputed_seconds, abs=0.01)
    assert g["checkpoint_blocked_seconds"] == pytest.approx(1 + rec.checkpoint_blocked_seconds, abs=0.01)
    assert g["pending_seconds"] == 4
    own = cost["worker_seconds"] - 100
    assert rec.startup_seconds + rec.productive_seconds < own < time.monotonic() - t0
    assert cost["estimated_usd"] == pytest.approx(0.1 + own / 3600 * 3.6, abs=1e-5)
    assert g["productive_usd"] == pytest.approx(
        g["productive_seconds"] * cost["estimated_usd"] / cost["worker_seconds"]
    )
    assert 0 < g["ratio"] < 1 and g["other_seconds"] >= 0
    assert cost["tokens"] == card["tokens_seen"] > 0
    assert cost["usd_per_million_tokens"] == pytest.approx(cost["estimated_usd"] / cost["tokens"] * 1e6, rel=1e-3)


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_high_water_mark_is_throttled_and_never_fails_training(minio, capsys):
    from kubetune_trainer.goodput import HighWaterMark

    bucket, client, clock = minio.make_bucket(), minio.client(), Clock()
    mark = HighWaterMark(client, f"s3://{bucket}/checkpoints/ns/hw/uid-hw", interval=10.0, clock=clock)
    assert mark.read() == 0  # none yet
    mark.note(3)
    mark.close()  # (waits for the write in flight)
    clock.t = 5.0
    mark.note(4)  # within the interval: not written
    assert mark.read() == 3
    clock.t = 10.0
    mark.note(5)
    mark.close(6)  # the last step, written at exit
    assert mark.read() == 6
    gone = HighWaterMark(client, "s3://no-such-bucket/checkpoints/ns/hw/uid-hw", interval=0.0)
    assert gone.read() == 0
    gone.note(1)
    gone.note(2)
    gone.close(3)
    assert capsys.readouterr().out.count("highwater_mark_unavailable") == 1
