"""The chart's KubetuneJobStalled alert on real scraped data: two real trainer processes against
MinIO, scraped by a real Prometheus with the rule the real `helm` renders (a short window and
`for`). One stalls after its first step while its HTTP server keeps serving (the step-delay test
knob, KUBETUNE_STEP_DELAY_SECONDS, set to an hour: a hung collective as Prometheus sees it); the
other trains at its pace. The alert fires for the first, and never for the second."""

from __future__ import annotations

import time

import pytest

from kubetune_dev.alert_rules import write_rules_file
from kubetune_dev.procs import free_port, terminate
from kubetune_dev.tiny_model import instruction_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config, trainer_env
from tests.fixtures.control_plane import wait_for
from tests.fixtures.tiny_model import start_trainer

pytestmark = pytest.mark.s3

WINDOW, FOR = "10s", "5s"


def test_stalled_trainer_fires_the_alert_and_a_healthy_one_does_not(
    tmp_path, minio, minio_bucket, tiny_model_dir, prometheus
):
    data = str(write_jsonl(tmp_path / "data.jsonl", instruction_records(200, seed=3)))
    procs, targets = {}, []
    for name, steps, delay in (("stalled", 50, 3600.0), ("healthy", 60, 0.3)):
        cfg = trainer_config(
            bucket=minio_bucket,
            endpoint=minio.endpoint,
            model_dir=tiny_model_dir,
            data_uri=data,
            name=name,
            training={"maxSteps": steps, "loggingSteps": 5},
            checkpoints={"everySteps": 20},
        )
        port = free_port()
        env = trainer_env(
            tmp_path / name, cfg, minio.env(), KUBETUNE_METRICS_PORT=port, KUBETUNE_STEP_DELAY_SECONDS=delay
        )
        procs[name] = start_trainer(env, tmp_path / f"{name}.log")
        # the target labels the chart's PodMonitor gives a trainer pod
        labels = {"job_namespace": "ns", "finetunejob": name, "worker_pod": f"{name}-a0-w0", "worker_node": "n"}
        targets.append({"targets": [f"127.0.0.1:{port}"], "labels": labels})
    rules = write_rules_file(
        tmp_path / "rules.yaml",
        *("--set", f"metrics.prometheusRule.alerts.jobStalled.window={WINDOW}"),
        *("--set", f"metrics.prometheusRule.alerts.jobStalled.for={FOR}"),
        operator_job="kubetune-operator",
    )
    try:
        start = time.time()
        prom = prometheus({}, rule_files=[rules], scrape_configs=[{"job_name": "trainers", "static_configs": targets}])

        def firing() -> list[dict]:
            alerts = prom.query('ALERTS{alertname="KubetuneJobStalled", alertstate="firing"}')
            return [a["metric"] for a in alerts]

        fired = wait_for(firing, timeout=180, interval=1, what="KubetuneJobStalled firing")
        assert [(a["job_namespace"], a["finetunejob"], a["namespace"]) for a in fired] == [("ns", "stalled", "ns")]
        # stuck in its first step: the hook sleeps before the step is published (as a hung all-reduce would)
        assert prom.value('kubetune_trainer_step{finetunejob="stalled"}') == 0
        assert prom.value('kubetune_trainer_total_steps{finetunejob="stalled"}') == 50

        assert procs["healthy"].wait(timeout=300) == 0, (tmp_path / "healthy.log").read_text()[-3000:]
        end = time.time()
        healthy_steps = prom.query_range('kubetune_trainer_step{finetunejob="healthy"}', start, end, 1)
        assert max(float(v) for s in healthy_steps for _, v in s["values"]) >= 50  # scraped while training
        # Never firing for the healthy trainer, over its whole run (on a busy host its start-up, from the
        # step count known to the first step, can take the window: pending, then resolved by its steps).
        healthy = 'ALERTS{alertname="KubetuneJobStalled", alertstate="firing", finetunejob="healthy"}'
        assert not prom.query_range(healthy, start, end, 1)
    finally:
        for proc in procs.values():
            terminate(proc, timeout=10)
