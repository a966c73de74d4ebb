"""Goodput facts and NVML at scrape time, through the trainer's real registry and exposition."""

import json

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_contract.progress import ProgressRecord
from kubetune_dev.prometheus import promtool_check_metrics
from kubetune_trainer.goodput import Goodput
from kubetune_trainer.metrics import TrainerMetrics


def values(m: TrainerMetrics) -> dict[str, float]:
    text = generate_latest(m.registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_steps_up_to_the_highest_step_reached_are_recomputed_not_productive():
    m = TrainerMetrics()
    g = Goodput(m, started=100.0)
    assert "kubetune_trainer_startup_seconds" not in values(m)  # absent until the first step
    g.resumed(highest_before=7)  # resumed from step 4 after an attempt had reached step 7
    g.training_starts(now=112.5)
    for step in range(5, 11):
        g.step_done(step, 0.5)
    g.checkpoint_blocked(0.25)
    v = values(m)
    assert v["kubetune_trainer_recomputed_steps_total"] == 3  # 5, 6, 7
    assert v["kubetune_trainer_recomputed_seconds_total"] == 1.5
    assert v["kubetune_trainer_productive_seconds_total"] == 1.5  # 8, 9, 10
    assert v["kubetune_trainer_step_seconds_count"] == 6 and v["kubetune_trainer_step_seconds_sum"] == 3.0
    assert v["kubetune_trainer_startup_seconds"] == 12.5
    assert v["kubetune_trainer_checkpoint_blocked_seconds_total"] == 0.25
    rec = ProgressRecord.model_validate({"phase": "training", **g.progress_fields()})
    assert (rec.recomputed_steps, rec.productive_seconds, rec.startup_seconds) == (3, 1.5, 12.5)
    assert rec.recomputed_seconds == 1.5
    assert "recomputedSteps" in json.dumps(rec.to_json_dict())  # by alias, like every field


def test_mfu_and_flops_per_token_are_absent_until_known():
    m = TrainerMetrics()
    assert not {"kubetune_trainer_mfu_ratio", "kubetune_trainer_model_flops_per_token"} & set(values(m))
    m.known(m.flops_per_token, 46.9e9)
    m.known(m.mfu, 0.41)
    m.known(m.mfu, 0.42)  # registered once
    v = values(m)
    assert v["kubetune_trainer_model_flops_per_token"] == 46.9e9 and v["kubetune_trainer_mfu_ratio"] == 0.42
    code, complaints = promtool_check_metrics(generate_latest(m.registry).decode())
    assert code == 0 and complaints.strip() == "", complaints


class _Util:
    gpu = 87


class _Mem:
    used, total = 30 * 2**30, 80 * 2**30


class FlakyNvml:
    """A driver whose second GPU fell off the bus (NVMLError_GpuIsLost at every query)."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self):  # noqa: N802
        pass

    def nvmlDeviceGetCount(self):  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):  # noqa: N802
        return i

    def nvmlDeviceGetUtilizationRates(self, h):  # noqa: N802
        if h == 1:
            raise self.NVMLError("GPU is lost")
        return _Util()

    def nvmlDeviceGetMemoryInfo(self, h):  # noqa: N802
        return _Mem()


def test_an_nvml_error_at_scrape_time_drops_that_gpus_series_and_logs_once(capsys):
    m = TrainerMetrics(nvml=FlakyNvml())
    for _ in range(3):
        text = generate_latest(m.registry).decode()
    gpus = {
        (s.name, s.labels["gpu"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if "gpu" in s.labels
    }
    assert gpus == {
        ("kubetune_trainer_gpu_utilization_ratio", "0"): 0.87,
        ("kubetune_trainer_gpu_memory_used_bytes", "0"): 30 * 2**30,
        ("kubetune_trainer_gpu_memory_total_bytes", "0"): 80 * 2**30,
    }
    assert capsys.readouterr().out.count("nvml_scrape_failed") == 1


def test_without_nvml_the_gpu_series_are_absent_not_zero():
    import importlib.util

    m = TrainerMetrics()
    if importlib.util.find_spec("pynvml") is None:
        assert not m.nvml.available
    if not m.nvml.available:  # no driver here
        assert "kubetune_trainer_gpu" not in generate_latest(m.registry).decode()
