"""Two trainer processes (WORLD_SIZE=2, gloo on 127.0.0.1) train as one job: rank 0 alone logs
progress and uploads; both checkpoint at the same steps; a SIGTERM to rank 1 alone stops both at
the same step with one durable checkpoint; restarted, they resume together and finish."""

import signal

import pytest

from kubetune_contract.progress import ExitCode
from kubetune_dev.procs import free_port
from kubetune_dev.tiny_model import instruction_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config, trainer_env
from tests.fixtures.tiny_model import events, start_trainer, wait_for_event

pytestmark = pytest.mark.s3


def test_two_gloo_ranks_checkpoint_once_and_stop_together(tmp_path, minio, tiny_model_dir):
    bucket = minio.make_bucket()
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(80, seed=3))
    cfg = trainer_config(
        bucket=bucket,
        endpoint=minio.endpoint,
        model_dir=tiny_model_dir,
        data_uri=str(data),
        name="ddp",
        workers=2,
        training={"maxSteps": 12, "batchSize": 2},
        checkpoints={"everySteps": 3},
    )

    def launch(attempt, **extra):
        port = free_port()
        procs, logs_ = [], []
        for rank in (0, 1):
            env = trainer_env(
                tmp_path / f"a{attempt}-r{rank}",
                cfg,
                minio.env(),
                RANK=rank,
                WORLD_SIZE=2,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                KUBETUNE_DIST_TIMEOUT_SECONDS=120,
                **extra,
            )
            log = tmp_path / f"a{attempt}-r{rank}.log"
            procs.append(start_trainer(env, log))
            logs_.append(log)
        return procs, logs_

    procs, logs_ = launch(1, KUBETUNE_STEP_DELAY_SECONDS=0.4)
    wait_for_event(procs[0], logs_[0], lambda e: e.get("event") == "step" and e["step"] >= 4)
    procs[1].send_signal(signal.SIGTERM)  # only rank 1 is told
    codes = [p.wait(120) for p in procs]
    assert codes == [ExitCode.PREEMPTED, ExitCode.PREEMPTED], [log.read_text()[-3000:] for log in logs_]

    r0, r1 = events(logs_[0]), events(logs_[1])
    stopped = next(e for e in r0 if e["event"] == "preempted")["step"]
    assert 4 <= stopped < 12
    saves = [(e["step"], e["reason"]) for e in r0 if e["event"] == "checkpoint_saved_locally"]
    assert saves == [(s, "interval") for s in range(3, stopped + 1, 3) if s != stopped] + [
        (stopped, "sigterm")
    ] or saves == [(s, "interval") for s in range(3, stopped + 1, 3)]
    assert not [e for e in r1 if e["event"].startswith("checkpoint")]  # only rank 0 uploads
    assert not [e for e in r1 if e["event"] == "step"]  # progress lines from rank 0 only
    assert [e for e in r1 if e["event"] == "signal_received"] and not [e for e in r0 if e["event"] == "signal_received"]
    client = minio.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="checkpoints/ns/ddp/uid-ddp/")["Contents"]]
    manifests = sorted(k for k in keys if k.endswith("MANIFEST.json"))
    assert manifests[-1].endswith(f"step-{stopped:09d}-a0/MANIFEST.json")
    assert len(manifests) == len({s for s, _ in saves})

    procs, logs_ = launch(2)
    codes = [p.wait(180) for p in procs]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs_]
    for log in logs_:
        assert [e["step"] for e in events(log, "resumed")] == [stopped]
    steps = [e["step"] for e in events(logs_[0], "step")]
    assert steps[-1] == 12 and steps[0] == stopped + 1
    assert events(logs_[0], "done") and not events(logs_[1], "done")
