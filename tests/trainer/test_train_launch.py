"""Several workers in one pod: the launcher starts them, forwards SIGTERM, combines exit codes."""

import signal

import pytest

from kubetune_contract.progress import ExitCode
from kubetune_dev.procs import free_port
from kubetune_dev.tiny_model import instruction_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config, trainer_env
from kubetune_trainer.launch import combine
from tests.fixtures.tiny_model import events, start_trainer, wait_for_event


def test_exit_codes_combine_with_user_errors_first():
    assert combine([0, 0]) == ExitCode.SUCCESS
    assert combine([3, 3]) == ExitCode.PREEMPTED
    assert combine([3, 0]) == ExitCode.PREEMPTED
    assert combine([3, -9]) == ExitCode.RETRIABLE
    assert combine([1, 2]) == ExitCode.USER_ERROR


@pytest.mark.s3
def test_launcher_forwards_sigterm_to_its_workers(tmp_path, minio, tiny_model_dir):
    bucket = minio.make_bucket()
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(40, seed=4))
    cfg = trainer_config(
        bucket=bucket,
        endpoint=minio.endpoint,
        model_dir=tiny_model_dir,
        data_uri=str(data),
        name="pod",
        training={"maxSteps": 40},
        checkpoints={"everySteps": 100},
    )
    env = trainer_env(
        tmp_path / "run",
        cfg,
        minio.env(),
        KUBETUNE_PROCS_PER_WORKER=2,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=free_port(),
        KUBETUNE_STEP_DELAY_SECONDS=0.3,
    )
    log = tmp_path / "pod.log"
    launcher = start_trainer(env, log)
    wait_for_event(launcher, log, lambda e: e.get("event") == "step" and e["step"] >= 2)
    launcher.send_signal(signal.SIGTERM)  # what the kubelet does to the container's PID 1
    assert launcher.wait(120) == ExitCode.PREEMPTED, log.read_text()[-4000:]
    ev = events(log)
    assert next(e for e in ev if e["event"] == "local_workers_exited")["codes"] == [3, 3]
    assert sorted(e["rank"] for e in ev if e["event"] == "signal_received") == [0, 1]
    stopped = next(e for e in ev if e["event"] == "preempted")["step"]
    keys = [o["Key"] for o in minio.client().list_objects_v2(Bucket=bucket, Prefix="checkpoints/")["Contents"]]
    assert any(k.endswith(f"step-{stopped:09d}-a0/MANIFEST.json") for k in keys), keys  # attempt 0's directory
