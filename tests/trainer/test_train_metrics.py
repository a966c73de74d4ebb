"""/metrics and /progress; throttled progress; termination log; progress can never fail training."""

import json
import urllib.request

from kubetune_contract.progress import ProgressRecord
from kubetune_trainer.metrics import MetricsServer, TrainerMetrics
from kubetune_trainer.progress import Progress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.status, r.headers.get("Content-Type"), r.read().decode()


def test_metrics_and_progress_endpoints():
    m = TrainerMetrics()
    p = Progress(interval_seconds=0.0)
    srv = MetricsServer(m, p.as_json_dict, port=0, host="127.0.0.1")
    try:
        assert srv.port
        m.step.set(7)
        m.loss.set(1.25)
        m.lr.set(1e-4)
        m.tps.set(900.0)
        m.sps.set(3.0)
        m.tokens.inc(4096)
        p.update(phase="training", step=7, total_steps=10, loss=1.25, tokens_seen=4096)
        status, ctype, body = _get(srv.port, "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        for line in (
            "kubetune_trainer_step 7.0",
            "kubetune_trainer_loss 1.25",
            "kubetune_trainer_learning_rate 0.0001",
            "kubetune_trainer_tokens_per_second 900.0",
            "kubetune_trainer_samples_per_second 3.0",
            "kubetune_trainer_tokens_total 4096.0",
        ):
            assert line in body
        assert "kubetune_trainer_gpu" not in body  # no NVML on CPU
        status, ctype, body = _get(srv.port, "/progress")
        rec = ProgressRecord.model_validate(json.loads(body))
        assert ctype == "application/json" and rec.step == 7 and rec.total_steps == 10
        assert "totalSteps" in json.loads(body) and "tokensSeen" in json.loads(body)  # by alias
        assert rec.progress_percentage == 70
    finally:
        srv.close()


def test_progress_is_throttled_but_phase_changes_publish_at_once():
    clock = Clock()
    p = Progress(interval_seconds=10, clock=clock)
    p.update(phase="training", step=1)
    assert p.record().step == 1
    clock.t += 3
    p.update(step=2)
    assert p.record().step == 1  # within the interval: not published
    clock.t += 8
    p.update(step=3)
    assert p.record().step == 3
    p.update(phase="uploading")
    assert p.record().phase == "uploading"
    p.update(step=-5, loss="not a number")  # invalid: ignored, never raises
    p.update(force=True)
    assert p.record().phase == "uploading"


def test_termination_log_fits_the_kubelet_limit(tmp_path):
    p = Progress(1.0)
    p.update(force=True, phase="failed", message="x" * 2048, step=3)
    path = tmp_path / "termination-log"
    assert p.write_termination_log(path)
    text = path.read_text()
    assert len(text.encode()) < 4096
    assert ProgressRecord.model_validate_json(text).phase == "failed"
    assert not p.write_termination_log(tmp_path / "no" / "such" / "dir")  # not writable: False, no raise
