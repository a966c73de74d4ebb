"""A job that asked for GPUs never trains silently on the CPU: on a machine where CUDA is not usable
(this one) the trainer exits at start with exit code 2 (a user error: not retried) and a message
naming torch's CUDA, the driver, the visible devices and the fix."""

import json
import time

import pytest

from kubetune_contract.progress import ExitCode
from kubetune_dev.tiny_model import instruction_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config, trainer_env
from kubetune_trainer import gpu
from tests.fixtures.tiny_model import events, start_trainer, tiny_model_dir  # noqa: F401


def _run(tmp_path, tiny_model_dir, gpus: int, **env_extra):
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(8, seed=1))
    # An endpoint nothing listens on: the trainer must stop before it ever talks to S3.
    cfg = trainer_config(
        bucket="bucket", endpoint="http://127.0.0.1:9", model_dir=tiny_model_dir, data_uri=str(data), gpusPerWorker=gpus
    )
    env = trainer_env(tmp_path / "run", cfg, {}, **env_extra)
    log = tmp_path / "trainer.log"
    t0 = time.monotonic()
    proc = start_trainer(env, log)
    code = proc.wait(120)
    return code, time.monotonic() - t0, log, tmp_path / "run" / "termination-log"


@pytest.mark.parametrize(
    "env, fix",
    [
        ({}, "no NVIDIA driver is visible in the container"),  # this machine as it is
        ({"CUDA_VISIBLE_DEVICES": ""}, "remove CUDA_VISIBLE_DEVICES"),  # an empty variable hides every GPU
    ],
)
def test_a_gpu_job_without_usable_cuda_fails_at_start_with_the_fix(tmp_path, tiny_model_dir, env, fix):
    code, seconds, log, termination = _run(tmp_path, tiny_model_dir, 2, **env)
    assert code == ExitCode.USER_ERROR, log.read_text()[-3000:]
    message = json.loads(termination.read_text())["message"]
    for fact in ("resources.gpus=2", "torch_cuda=", "CUDA_VISIBLE_DEVICES=", "NVIDIA_VISIBLE_DEVICES=", "fix: "):
        assert fact in message, message
    assert fix in message
    ev = events(log)
    assert not [e for e in ev if e["event"] in ("step", "model_loaded", "s3_access_ok")]
    assert seconds < 60


def test_the_fix_names_the_likely_cause():
    cpu_torch = {"torch_cuda": None}
    assert "CPU-only build" in gpu.fix_for(cpu_torch)
    no_driver = {"torch_cuda": "13.2", "CUDA_VISIBLE_DEVICES": None, "NVIDIA_VISIBLE_DEVICES": None, "nvml": "x"}
    assert "no NVIDIA driver" in gpu.fix_for(no_driver)
    old = {"torch_cuda": "13.2", "driver": "570.86.15", "driver_cuda": "12.8", "NVIDIA_VISIBLE_DEVICES": "all"}
    fix = gpu.fix_for(old)
    assert "570.86.15" in fix and "CUDA up to 12.8" in fix and "needs CUDA 13.2" in fix
    assert "NVIDIA_VISIBLE_DEVICES" in gpu.fix_for({"torch_cuda": "13.2", "NVIDIA_VISIBLE_DEVICES": "void"})


def test_force_cpu_is_the_explicit_way_to_run_a_gpu_job_on_the_cpu():
    assert gpu.use_cuda(1, force_cpu=True) is False
    assert gpu.use_cuda(0, force_cpu=False) is False  # a CPU job on a CPU machine
