"""The chart's opt-in monitoring: ServiceMonitor, PodMonitor and PrometheusRule, rendered by the real
`helm`; the rules checked and their alerts unit-tested by the real `promtool` (series in, alerts out:
what a platform team would see fire, with its text)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_dev.alert_rules import chart_rules, write_rules_file
from kubetune_dev.jobs import job_manifest
from kubetune_dev.versions import binary
from kubetune_operator import api, render, valuesgen
from kubetune_operator.settings import Settings

NS = "kubetune-system"
OPERATOR_JOB = "kt-operator-metrics"  # the metrics Service: prometheus-operator names the job after it
ON = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true"]
RULES = [*ON, "--set", "metrics.prometheusRule.enabled=true"]


def helm_template(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(binary("helm")), "template", "kt", str(valuesgen.CHART), "-n", NS, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def docs(*args: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(helm_template(*args).stdout) if d]


def one(rendered: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in rendered if d["kind"] == kind]
    return found


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary("promtool")), *args], cwd=cwd, capture_output=True, text=True)


# ---- opt-in --------------------------------------------------------------------------------------
def test_nothing_monitoring_related_renders_by_default():
    """A cluster without the prometheus-operator CRDs installs the chart as it comes."""
    rendered = docs()
    assert not [d["kind"] for d in rendered if d["apiVersion"].startswith("monitoring.coreos.com/")]
    kinds = {d["kind"] for d in docs(*RULES)}
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds


def test_operator_down_alert_needs_a_scrape_job_to_watch():
    """Without the ServiceMonitor the alert would watch a job nobody scrapes and fire forever: refused."""
    bad = helm_template("--set", "metrics.prometheusRule.enabled=true", check=False)
    assert bad.returncode != 0 and "metrics.prometheusRule.operatorJob" in bad.stderr
    rule = one(
        docs("--set", "metrics.prometheusRule.enabled=true", "--set", "metrics.prometheusRule.operatorJob=kt"),
        "PrometheusRule",
    )
    down = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "KubetuneOperatorDown")
    assert 'up{job="kt",namespace="kubetune-system"}' in down["expr"]


def test_durations_and_thresholds_are_validated():
    for setting in (
        "metrics.serviceMonitor.interval=30 seconds",
        "metrics.prometheusRule.alerts.jobStalled.window=fifteen",
        "metrics.prometheusRule.alerts.preemptionStorm.threshold=0",
    ):
        bad = helm_template(*RULES, "--set", setting, check=False)
        assert bad.returncode != 0 and setting.split("=")[0].rsplit(".", 1)[1] in bad.stderr, (setting, bad.stderr)
    bad = helm_template(*RULES, "--set-json", "metrics.prometheusRule.alerts.gpuIdle.threshold=1.5", check=False)
    assert bad.returncode != 0 and "threshold" in bad.stderr


# ---- the monitors ------------------------------------------------------------------------------------
def test_service_monitor_selects_the_operators_metrics_service():
    rendered = docs(*ON)
    monitor = one(rendered, "ServiceMonitor")
    service = one(rendered, "Service")
    deployment = one(rendered, "Deployment")
    assert monitor["metadata"]["namespace"] == NS and service["metadata"]["name"] == OPERATOR_JOB
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NS]}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "30s", "honorLabels": False}
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    assert "metrics" in {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}

    tuned = one(
        docs(
            *ON,
            "--set-json",
            'metrics.serviceMonitor.additionalLabels={"release":"kube-prometheus-stack"}',
            "--set",
            "metrics.serviceMonitor.interval=15s",
            "--set",
            "metrics.serviceMonitor.scrapeTimeout=10s",
            "--set",
            "metrics.serviceMonitor.honorLabels=true",
        ),
        "ServiceMonitor",
    )
    assert tuned["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert tuned["metadata"]["labels"]["app.kubernetes.io/instance"] == "kt"
    (endpoint,) = tuned["spec"]["endpoints"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"], endpoint["honorLabels"]) == ("15s", "10s", True)


def _sanitized(label: str) -> str:
    """The name Prometheus' Kubernetes discovery gives a pod label."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)


def test_pod_monitor_scrapes_the_trainer_pods_the_operator_creates():
    manifest = job_manifest(name="llama-lora")
    manifest["metadata"].update(namespace="ml", uid="u-1")
    pod = render.worker_pod(manifest, api.FineTuneJobSpec.model_validate(manifest["spec"]), Settings(), 0, 0, "x")
    monitor = one(docs(*ON, "--set-json", 'metrics.podMonitor.additionalLabels={"release":"kps"}'), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert (endpoint["path"], endpoint["interval"]) == ("/metrics", "30s") and "honorLabels" not in endpoint
    targets = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert targets == {
        "finetunejob": [_sanitized(render.LABEL_JOB_NAME)],
        "job_namespace": ["__meta_kubernetes_namespace"],
        "worker_pod": ["__meta_kubernetes_pod_name"],
        "worker_node": ["__meta_kubernetes_pod_node_name"],
    }
    assert pod["metadata"]["labels"][render.LABEL_JOB_NAME] == "llama-lora"
    watched = one(docs(*ON, "--set", "operator.watchNamespace=ml"), "PodMonitor")
    assert watched["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}


# ---- the rules, with promtool ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def rules(tmp_path_factory) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The rendered PrometheusRule's groups as a rules file, and its alerts by name."""
    path = tmp_path_factory.mktemp("rules") / "kubetune-rules.yaml"
    write_rules_file(path, "--set-json", 'metrics.prometheusRule.alertLabels={"team":"ml-platform"}')
    groups = yaml.safe_load(path.read_text())["groups"]
    return path, {r["alert"]: r for g in groups for r in g["rules"]}


def test_rendered_rules_pass_promtool_check(rules):
    path, by_name = rules
    out = promtool("check", "rules", path.name, cwd=path.parent)
    assert out.returncode == 0 and "SUCCESS: 8 rules found" in out.stdout, out.stdout + out.stderr
    assert set(by_name) == {
        "KubetuneJobStalled",
        "KubetuneGpuIdle",
        "KubetuneJobPreemptionStorm",
        "KubetuneJobRestarting",
        "KubetuneJobBudgetNearlyExceeded",
        "KubetuneJobBudgetExceeded",
        "KubetuneOperatorDown",
        "KubetuneReconcileErrors",
    }
    for name, r in by_name.items():
        assert {"summary", "description", "runbook"} <= r["annotations"].keys(), name
        assert r["labels"]["severity"] and r["labels"]["team"] == "ml-platform" and "for" in r, name
    readme = (valuesgen.CHART / "README.md").read_text()
    assert not [name for name in by_name if name not in readme], "charts/kubetune/README.md documents each alert"


JOB_ALERTS = ("jobStalled", "gpuIdle", "preemptionStorm", "repeatedRestarts", "budgetNearlyExceeded", "budgetExceeded")


def _off(*alerts: str) -> list[str]:
    return [a for name in alerts for a in ("--set", f"metrics.prometheusRule.alerts.{name}.enabled=false")]


@pytest.mark.parametrize(
    "args, expected",
    [
        (_off(*JOB_ALERTS), ["KubetuneOperatorDown", "KubetuneReconcileErrors"]),
        (
            _off("operatorDown", "reconcileErrors", "gpuIdle"),
            [
                "KubetuneJobStalled",
                "KubetuneJobPreemptionStorm",
                "KubetuneJobRestarting",
                "KubetuneJobBudgetNearlyExceeded",
                "KubetuneJobBudgetExceeded",
            ],
        ),
        (_off(*JOB_ALERTS, "operatorDown", "reconcileErrors"), []),
    ],
)
def test_rules_stay_valid_with_alerts_switched_off(tmp_path, args, expected):
    path = write_rules_file(tmp_path / "rules.yaml", *args)
    out = promtool("check", "rules", path.name, cwd=tmp_path)
    assert out.returncode == 0 and f"SUCCESS: {len(expected)} rules found" in out.stdout, out.stdout + out.stderr
    groups = yaml.safe_load(path.read_text())["groups"]
    assert [r["alert"] for g in groups for r in g["rules"]] == expected
    assert all(g["rules"] for g in groups)  # no empty group


def test_thresholds_windows_and_severities_reach_the_rules(tmp_path):
    path = write_rules_file(
        tmp_path / "rules.yaml",
        *("--set-json", "metrics.prometheusRule.alerts.gpuIdle.threshold=0.25"),
        *("--set", "metrics.prometheusRule.alerts.gpuIdle.for=1h"),
        *("--set", "metrics.prometheusRule.alerts.jobStalled.window=1h30m"),
        *("--set", "metrics.prometheusRule.alerts.preemptionStorm.threshold=5"),
        *("--set", "metrics.prometheusRule.alerts.preemptionStorm.window=6h"),
        *("--set", "metrics.prometheusRule.alerts.preemptionStorm.severity=critical"),
        *("--set", "metrics.prometheusRule.runbookUrl=https://wiki.example/kubetune/"),
    )
    assert promtool("check", "rules", path.name, cwd=tmp_path).returncode == 0
    by_name = {r["alert"]: r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]}
    idle, stalled, storm = (
        by_name["KubetuneGpuIdle"],
        by_name["KubetuneJobStalled"],
        by_name["KubetuneJobPreemptionStorm"],
    )
    assert idle["expr"].endswith("< 0.25") and idle["for"] == "1h" and "below 25%" in idle["annotations"]["description"]
    assert "[1h30m]" in stalled["expr"] and "offset 1h30m" in stalled["expr"]
    assert "[6h]" in storm["expr"] and storm["expr"].endswith(">= 5") and storm["labels"]["severity"] == "critical"
    assert storm["annotations"]["runbook_url"] == "https://wiki.example/kubetune#kubetunejobpreemptionstorm"


def test_budget_alerts_split_at_the_exceeded_threshold(tmp_path):
    by_name = {r["alert"]: r for g in chart_rules(operator_job="kt")["groups"] for r in g["rules"]}
    assert by_name["KubetuneJobBudgetNearlyExceeded"]["expr"].endswith(">= 0.8 < 1")
    assert by_name["KubetuneJobBudgetExceeded"]["expr"].endswith(">= 1")
    # Without the exceeded alert the nearly-exceeded one goes on firing past 100%.
    alone = chart_rules(*_off("budgetExceeded"), operator_job="kt")
    (nearly,) = [r for g in alone["groups"] for r in g["rules"] if "Budget" in r["alert"]]
    assert nearly["expr"].endswith(">= 0.8")


def _series(metric: str, labels: dict[str, str], values: str) -> dict[str, str]:
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{body}}}", "values": values}


def _trainer(job: str, metric: str, values: str, **extra: str) -> dict[str, str]:
    """A trainer series as the PodMonitor labels it."""
    labels = {"job": "kubetune-system/kt-operator-trainers", "namespace": "ml", "pod": f"{job}-a0-w0"}
    return _series(
        metric, {**labels, "job_namespace": "ml", "finetunejob": job, "worker_pod": f"{job}-a0-w0", **extra}, values
    )


def _operator(metric: str, values: str, job: str = OPERATOR_JOB, **extra: str) -> dict[str, str]:
    """An operator series as the ServiceMonitor labels it."""
    return _series(metric, {"job": job, "namespace": NS, "instance": "10.0.0.5:8080", **extra}, values)


def _alert(by_name: dict[str, dict[str, Any]], name: str, labels: dict[str, str], **text: str) -> dict[str, Any]:
    """One expected firing alert: its labels and its annotations as a user reads them."""
    severity = by_name[name]["labels"]["severity"]
    annotations = {**text, "runbook": by_name[name]["annotations"]["runbook"]}
    return {"exp_labels": {"severity": severity, "team": "ml-platform", **labels}, "exp_annotations": annotations}


def _job_labels(job: str) -> dict[str, str]:
    return {"namespace": "ml", "job_namespace": "ml", "finetunejob": job}


def test_alerts_fire_on_the_series_that_should_fire_them(rules):
    path, by_name = rules
    stalled = "No optimizer step in 15m: the trainer is stuck at step 10 of an unfinished run."
    tests = [
        {
            "name": "stalled: the step stops moving (not: still moving, finished, a pod still loading)",
            "interval": "1m",
            "input_series": [
                _trainer("moving", "kubetune_trainer_step", "0+1x60"),
                _trainer("moving", "kubetune_trainer_total_steps", "1000x60"),
                _trainer("stuck", "kubetune_trainer_step", "0+1x10 10x50"),  # no step after minute 10
                _trainer("stuck", "kubetune_trainer_total_steps", "1000x60"),
                _trainer("done", "kubetune_trainer_step", "0+10x10 100x50"),  # uploading its model
                _trainer("done", "kubetune_trainer_total_steps", "100x60"),
                _trainer("loading", "kubetune_trainer_step", "_x30 0x30"),  # a pod started at minute 30
                _trainer("loading", "kubetune_trainer_total_steps", "_x30 100x30"),
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "KubetuneJobStalled", "exp_alerts": []},
                {
                    "eval_time": "40m",
                    "alertname": "KubetuneJobStalled",
                    "exp_alerts": [
                        _alert(
                            by_name,
                            "KubetuneJobStalled",
                            _job_labels("stuck"),
                            summary="FineTuneJob ml/stuck is stalled",
                            description=stalled,
                        )
                    ],
                },
                {  # the loading pod counts once it has been scraped a whole window without a step
                    "eval_time": "55m",
                    "alertname": "KubetuneJobStalled",
                    "exp_alerts": [
                        _alert(
                            by_name,
                            "KubetuneJobStalled",
                            _job_labels("stuck"),
                            summary="FineTuneJob ml/stuck is stalled",
                            description=stalled,
                        ),
                        _alert(
                            by_name,
                            "KubetuneJobStalled",
                            _job_labels("loading"),
                            summary="FineTuneJob ml/loading is stalled",
                            description=stalled.replace("step 10", "step 0"),
                        ),
                    ],
                },
            ],
        },
        {
            "name": "GPU idle: low utilization fires; busy GPUs and CPU jobs (no GPU series) do not",
            "interval": "1m",
            "input_series": [
                _trainer("idle", "kubetune_trainer_gpu_utilization_ratio", "0.02x40", gpu="0"),
                _trainer("busy", "kubetune_trainer_gpu_utilization_ratio", "0.9x40", gpu="0"),
                _trainer("cpu", "kubetune_trainer_step", "0+1x40"),
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "KubetuneGpuIdle", "exp_alerts": []},  # not yet for 15m
                {
                    "eval_time": "30m",
                    "alertname": "KubetuneGpuIdle",
                    "exp_alerts": [
                        _alert(
                            by_name,
                            "KubetuneGpuIdle",
                            _job_labels("idle"),
                            summary="FineTuneJob ml/idle leaves its GPUs idle",
                            description="Mean GPU utilization 2% over 10m, below 10%, while the trainer runs.",
                        )
                    ],
                },
            ],
        },
        {
            "name": "preemptions and restarts: 3 in an hour fire, 1 does not",
            "interval": "1m",
            "input_series": [
                _operator(
                    "kubetune_job_preemptions_total", "0x5 1x5 2x5 3x45", job_namespace="ml", finetunejob="spotty"
                ),
                _operator("kubetune_job_preemptions_total", "0x10 1x50", job_namespace="ml", finetunejob="calm"),
                _operator("kubetune_job_restarts_total", "0x5 1x5 2x5 3x45", job_namespace="ml", finetunejob="crashy"),
                _operator("kubetune_job_restarts_total", "0x10 1x50", job_namespace="ml", finetunejob="calm"),
            ],
            "alert_rule_test": [
                {"eval_time": "12m", "alertname": "KubetuneJobPreemptionStorm", "exp_alerts": []},
                {
                    "eval_time": "30m",
                    "alertname": "KubetuneJobPreemptionStorm",
                    "exp_alerts": [
                        _alert(
                            by_name,
                            "KubetuneJobPreemptionStorm",
                            _job_labels("spotty"),
                            summary="FineTuneJob ml/spotty keeps being preempted",
                            description="3 preemptions in 1h; each one loses the steps since the last checkpoint "
                            "and a restart.",
                        )
                    ],
                },
                {
                    "eval_time": "30m",
                    "alertname": "KubetuneJobRestarting",
                    "exp_alerts": [
                        _alert(
                            by_name,
                            "KubetuneJobRestarting",
                            _job_labels("crashy"),
                            summary="FineTuneJob ml/crashy keeps failing and restarting",
                            description="3 restarts after worker failures (not preemptions) in 1h.",
                        )
                    ],
                },
            ],
        },
        {
            "name": "budget: 80% warns, 100% says suspended; by USD and by GPU-time; not without a budget or once done",
            "interval": "1m",
            "input_series": [
                _operator("kubetune_job_cost_usd_total", "0+0.1x120", job_namespace="ml", finetunejob="spendy"),
                _operator("kubetune_job_budget_usd", "10x120", job_namespace="ml", finetunejob="spendy"),
                *(
                    _operator(
                        "kubetune_job_gpu_seconds_total",
                        "0+45x120",
                        job_namespace="ml",
                        finetunejob="gpu",
                        capacity_type=c,
                    )
                    for c in ("spot", "on-demand")
                ),
                _operator("kubetune_job_budget_gpu_seconds", "10000x120", job_namespace="ml", finetunejob="gpu"),
                _operator("kubetune_job_cost_usd_total", "0+0.1x120", job_namespace="ml", finetunejob="unlimited"),
                _operator("kubetune_job_cost_usd_total", "9.5x120", job_namespace="ml", finetunejob="done"),
                _operator("kubetune_job_budget_usd", "10x120", job_namespace="ml", finetunejob="done"),
                _operator("kubetune_job_progress_ratio", "1x120", job_namespace="ml", finetunejob="done"),
            ],
            "alert_rule_test": [
                {"eval_time": "50m", "alertname": "KubetuneJobBudgetNearlyExceeded", "exp_alerts": []},
                {
                    "eval_time": "90m",
                    "alertname": "KubetuneJobBudgetNearlyExceeded",
                    "exp_alerts": [
                        _budget_alert(by_name, "KubetuneJobBudgetNearlyExceeded", "gpu", "maxGpuHours", "81%"),
                        _budget_alert(by_name, "KubetuneJobBudgetNearlyExceeded", "spendy", "maxUsd", "90%"),
                    ],
                },
                {"eval_time": "90m", "alertname": "KubetuneJobBudgetExceeded", "exp_alerts": []},
                {
                    "eval_time": "110m",
                    "alertname": "KubetuneJobBudgetNearlyExceeded",
                    "exp_alerts": [
                        _budget_alert(by_name, "KubetuneJobBudgetNearlyExceeded", "gpu", "maxGpuHours", "99%")
                    ],
                },
                {
                    "eval_time": "110m",
                    "alertname": "KubetuneJobBudgetExceeded",
                    "exp_alerts": [_budget_alert(by_name, "KubetuneJobBudgetExceeded", "spendy", "maxUsd", "110%")],
                },
            ],
        },
        {
            "name": "operator down: up == 0 fires after 5m",
            "interval": "1m",
            "input_series": [_operator("up", "1x10 0x20")],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "KubetuneOperatorDown", "exp_alerts": []},
                {"eval_time": "13m", "alertname": "KubetuneOperatorDown", "exp_alerts": []},  # pending
                {
                    "eval_time": "20m",
                    "alertname": "KubetuneOperatorDown",
                    "exp_alerts": [_operator_down(by_name)],
                },
            ],
        },
        {
            "name": "operator down: no target at all (Deployment gone, ServiceMonitor not selected)",
            "interval": "1m",
            "input_series": [_operator("up", "1x20", job="another-operator")],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "KubetuneOperatorDown", "exp_alerts": [_operator_down(by_name)]}
            ],
        },
        {
            "name": "reconcile errors: a steady API error rate fires; write conflicts and other operators do not",
            "interval": "1m",
            "input_series": [
                _operator("kubetune_reconcile_errors_total", "0+1x30", kind="api"),
                _operator("kubetune_reconcile_errors_total", "0+5x30", kind="conflict"),
                _operator("kubetune_reconcile_errors_total", "0+1x30", job="another-operator", kind="api"),
            ],
            "alert_rule_test": [
                {
                    "eval_time": "30m",
                    "alertname": "KubetuneReconcileErrors",
                    "exp_alerts": [
                        _alert(
                            by_name,
                            "KubetuneReconcileErrors",
                            {"namespace": NS, "kind": "api"},
                            summary="The kubetune operator fails to reconcile (api)",
                            description="15 failed reconciles of kind api in 15m.",
                        )
                    ],
                },
            ],
        },
    ]
    test_file = path.parent / "kubetune-rules-test.yaml"
    test_file.write_text(
        yaml.safe_dump({"rule_files": [path.name], "evaluation_interval": "1m", "tests": tests}, sort_keys=False)
    )
    out = promtool("test", "rules", test_file.name, cwd=path.parent)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def _budget_alert(by_name: dict[str, dict[str, Any]], name: str, job: str, limit: str, used: str) -> dict[str, Any]:
    nearly = name == "KubetuneJobBudgetNearlyExceeded"
    rest = (
        "used; the operator suspends the job at 100%."
        if nearly
        else "used: the operator has suspended the job (condition BudgetExceeded)."
    )
    return _alert(
        by_name,
        name,
        {**_job_labels(job), "budget": limit},
        summary=f"FineTuneJob ml/{job} has {'nearly used' if nearly else 'used'} its budget",
        description=f"{used} of spec.budget.{limit} {rest}",
    )


def _operator_down(by_name: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return _alert(
        by_name,
        "KubetuneOperatorDown",
        {"job": OPERATOR_JOB, "namespace": NS},
        summary="The kubetune operator is down",
        description=f"No target of scrape job {OPERATOR_JOB} (namespace {NS}) has been up for 5m: FineTuneJobs are "
        "not reconciled (running trainers go on, but nothing handles new jobs, preemptions or completions).",
    )
