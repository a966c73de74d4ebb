"""The chart's Grafana dashboards: the shipped JSON is its Python source's, the real `helm` renders it as
sidecar ConfigMaps only when asked, every panel queries the `${datasource}` variable with a unit and a
description, and the real `promtool` parses every query and evaluates the joins with the optional
exporters (trainer NVML gauges, DCGM, OpenCost) on series shaped like theirs."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_dev.versions import binary
from kubetune_operator import dashboards, valuesgen

NS = "kubetune-system"
BOARDS = {name: build() for name, build in dashboards.DASHBOARDS.items()}


def helm_docs(*args: str) -> list[dict[str, Any]]:
    cmd = [str(binary("helm")), "template", "kt", str(valuesgen.CHART), "-n", NS, *args]
    return [d for d in yaml.safe_load_all(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout) if d]


def targets() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(name, p, t) for name, board in BOARDS.items() for p in dashboards.panels(board) for t in p["targets"]]


def raw_expr(board: str, title: str, ref: str = "A") -> str:
    (found,) = [t for name, p, t in targets() if name == board and p["title"] == title and t["refId"] == ref]
    return str(found["expr"])


def expr(board: str, title: str, ref: str = "A", **values: str) -> str:
    return dashboards.expand(raw_expr(board, title, ref), values)


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary("promtool")), *args], cwd=cwd, capture_output=True, text=True)


# ---- the files and the chart --------------------------------------------------------------------------
def test_shipped_dashboards_are_their_sources():
    outputs = dashboards.outputs()
    assert sorted(p.name for p in outputs) == ["cost.json", "utilization.json"]
    stale = [p.name for p, text in outputs.items() if not p.exists() or p.read_text() != text]
    assert not stale, f"run `python -m kubetune_operator.crdgen` and commit: {stale}"
    assert sorted(p.name for p in dashboards.DASHBOARDS_DIR.iterdir()) == sorted(p.name for p in outputs)


def test_no_dashboard_configmap_unless_enabled():
    assert not [d for d in helm_docs() if d["kind"] == "ConfigMap"]


def test_enabled_dashboards_are_sidecar_configmaps_with_the_dashboards_json():
    rendered = helm_docs(
        "--set",
        "dashboards.enabled=true",
        "--set",
        "dashboards.namespace=monitoring",
        "--set-json",
        'dashboards.annotations={"grafana_folder":"kubetune"}',
        "--set",
        "dashboards.labels.team=ml",
    )
    maps = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "ConfigMap"}
    assert set(maps) == {"kt-operator-dashboard-cost", "kt-operator-dashboard-utilization"}
    for name, cm in maps.items():
        meta = cm["metadata"]
        assert meta["namespace"] == "monitoring"
        assert meta["labels"]["grafana_dashboard"] == "1" and meta["labels"]["team"] == "ml"
        assert meta["annotations"] == {"grafana_folder": "kubetune"}
        board = name.rsplit("-", 1)[1]
        assert json.loads(cm["data"][f"kubetune-{board}.json"]) == BOARDS[board]
    default_ns = [d for d in helm_docs("--set", "dashboards.enabled=true") if d["kind"] == "ConfigMap"]
    assert {d["metadata"]["namespace"] for d in default_ns} == {NS}
    assert all("annotations" not in d["metadata"] for d in default_ns)


# ---- the dashboards ------------------------------------------------------------------------------------
def test_variables_are_the_datasource_and_the_jobs():
    for board in BOARDS.values():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert list(variables) == ["datasource", "job_namespace", "finetunejob"]
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert variables["job_namespace"]["definition"] == "label_values(kubetune_job_info, job_namespace)"
        assert variables["finetunejob"]["definition"] == (
            'label_values(kubetune_job_info{job_namespace=~"$job_namespace"}, finetunejob)'
        )
        for name in ("job_namespace", "finetunejob"):
            assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert variables[name]["multi"] and variables[name]["includeAll"]


def test_every_panel_and_target_queries_the_datasource_variable_with_a_unit_and_description():
    for board in BOARDS.values():
        assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
        for p in dashboards.panels(board):
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["description"].strip() and p["fieldConfig"]["defaults"]["unit"], p["title"]
            assert p["targets"] and all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
            assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    titles = {name: [p["title"] for p in dashboards.panels(b)] for name, b in BOARDS.items()}
    assert len(titles["utilization"]) >= 18 and len(titles["cost"]) >= 18
    assert {"MFU", "Goodput breakdown", "Goodput ratio"} <= set(titles["utilization"])
    assert {"USD lost to preemption", "Goodput USD", "USD per 1M tokens", "CPU core-hours per job"} <= set(
        titles["cost"]
    )


def test_every_job_series_is_filtered_by_the_job_variables():
    """A panel never sums over jobs the user did not select (kubetune_jobs, by phase, is operator-wide)."""
    job_filter = 'job_namespace=~"$job_namespace", finetunejob=~"$finetunejob"'
    for _, p, t in targets():
        for metric, matchers in re.findall(r"\b(kubetune_\w+)(\{[^}]*\})?", t["expr"]):
            if metric != "kubetune_jobs":
                assert job_filter in matchers, (p["title"], metric)


def test_expand_gives_concrete_promql():
    out = dashboards.expand(
        raw_expr("utilization", "Step rate"), {"job_namespace": "ml", "finetunejob": "a"}, rate_interval="2m"
    )
    assert out == (
        'max by (job_namespace, finetunejob) (rate(kubetune_trainer_step{job_namespace=~"ml", finetunejob=~"a"}[2m]))'
    )
    assert "$1" in expr("utilization", "GPU utilization per job (DCGM)")  # label_replace's group, kept
    with pytest.raises(KeyError):
        dashboards.expand("up{x=$nope}")


def test_every_query_parses_with_promtool(tmp_path):
    rules = [
        {"record": f"{name}:panel_{p['id']}_{t['refId']}", "expr": dashboards.expand(t["expr"])}
        for name, p, t in targets()
    ]
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    out = promtool("check", "rules", "panels.yaml", cwd=tmp_path)
    assert out.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in out.stdout, out.stdout + out.stderr


# ---- the joins, evaluated by promtool on series shaped like the exporters' ------------------------------
def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    body = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{body}}}", "values": values}


OPERATOR = {"job": "kubetune-operator", "instance": "10.0.0.9:8080"}


def _pod(job: str, pod: str, node: str) -> dict[str, str]:
    return _series(
        "kubetune_job_pod_info",
        "1x40",
        **OPERATOR,
        job_namespace="ml",
        finetunejob=job,
        worker_pod=pod,
        worker_node=node,
        capacity_type="spot",
        rank="0",
    )


def _dcgm(metric: str, value: str, node: str, gpu: str, honor_labels: bool, pod: str = "") -> dict[str, str]:
    """A DCGM exporter series as kube-prometheus scrapes it: its own pod's target labels, and the GPU's
    pod as exported_pod/exported_namespace (or, with honorLabels, as pod/namespace)."""
    labels = {"job": "dcgm-exporter", "instance": f"{node}:9400", "gpu": gpu, "UUID": f"GPU-{node}-{gpu}"}
    labels |= {"Hostname": node, "modelName": "NVIDIA L4"}
    if honor_labels:
        labels |= {"namespace": "ml", "pod": pod} if pod else {}
    else:
        labels |= {"namespace": "gpu-operator", "pod": f"dcgm-{node}", "container": "exporter"}
        labels |= {"exported_namespace": "ml", "exported_pod": pod} if pod else {}
    return _series(metric, f"{value}x40", **labels)


def _sample(value: float, **labels: str) -> dict[str, Any]:
    body = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"labels": f"{{{body}}}", "value": value}


def test_panels_join_dcgm_opencost_and_trainer_series_to_jobs(tmp_path):
    """Job a runs pods on n1 and n2, job b shares n1: each job gets its own GPUs' DCGM numbers (pod
    mapping, with and without honorLabels), each node's numbers go to every job on it, unassigned GPUs
    to none, and OpenCost's node prices meet the operator's GPU-seconds. No duplicate-series errors."""
    util, tensor = "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"
    a1 = {"job_namespace": "ml", "finetunejob": "a", "worker_pod": "a-a0-w1", "worker_node": "n2"}
    series = [
        _pod("a", "a-a0-w0", "n1"),
        _pod("a", "a-a0-w1", "n2"),
        _pod("b", "b-a0-w0", "n1"),
        _dcgm(util, "75", "n1", "0", honor_labels=False, pod="a-a0-w0"),
        _dcgm(util, "25", "n1", "1", honor_labels=False, pod="b-a0-w0"),
        _dcgm(util, "50", "n2", "0", honor_labels=True, pod="a-a0-w1"),
        _dcgm(util, "0", "n2", "1", honor_labels=True),  # no pod: nobody's
        _dcgm(tensor, "0.5", "n1", "0", honor_labels=False, pod="a-a0-w0"),
        _dcgm(tensor, "0.25", "n2", "0", honor_labels=True, pod="a-a0-w1"),
        _series("node_gpu_hourly_cost", "2.5x40", job="opencost", instance="n1", node="n1"),
        _series("node_gpu_hourly_cost", "1.5x40", job="opencost", instance="n2", node="n2"),
        # two GPUs of job a, 15 s apart: 30 GPU-seconds a sample
        _series(
            "kubetune_job_gpu_seconds_total",
            "0+30x40",
            **OPERATOR,
            job_namespace="ml",
            finetunejob="a",
            capacity_type="spot",
        ),  # fmt: skip
        # job a's goodput (operator counters): 100 worker-seconds for 0.5 USD, 1,000 tokens; job b: no
        # worker time yet (its prices stay absent: no division by zero)
        *(
            _series(metric, f"{value}x40", **OPERATOR, job_namespace="ml", finetunejob=job)
            for job, metric, value in (
                ("a", "kubetune_job_worker_seconds_total", 100),
                ("a", "kubetune_job_cost_usd_total", 0.5),
                ("a", "kubetune_job_tokens_total", 1000),
                ("b", "kubetune_job_worker_seconds_total", 0),
                ("b", "kubetune_job_cost_usd_total", 0),
                ("b", "kubetune_job_tokens_total", 0),
            )
        ),
        *(
            _series(
                "kubetune_job_goodput_seconds_total",
                f"{value}x40",
                **OPERATOR,
                job_namespace="ml",
                finetunejob=job,
                category=category,
            )
            for job, category, value in (
                ("a", "productive", 60),
                ("a", "startup", 10),
                ("a", "checkpoint_blocked", 5),
                ("a", "lost_to_preemption", 15),
                ("b", "lost_to_preemption", 0),
            )
        ),
        _series("kubetune_trainer_step", "0+15x40", job="trainers", **a1),
        _series("kubetune_trainer_gpu_utilization_ratio", "0.5x40", job="trainers", gpu="0", **a1),
        _series("kubetune_trainer_gpu_memory_used_bytes", "6e9x40", job="trainers", gpu="0", **a1),
        _series("kubetune_trainer_gpu_memory_total_bytes", "24e9x40", job="trainers", gpu="0", **a1),
    ]
    a, b = {"job_namespace": "ml", "finetunejob": "a"}, {"job_namespace": "ml", "finetunejob": "b"}
    cases = {
        ("utilization", "GPU utilization per job (DCGM)"): [_sample(0.625, **a), _sample(0.25, **b)],
        ("utilization", "Tensor core activity per job (DCGM)"): [_sample(0.375, **a)],
        ("utilization", "GPU utilization of the jobs' nodes (DCGM)"): [
            _sample(0.5, **a, worker_node="n1"),
            _sample(0.25, **a, worker_node="n2"),
            _sample(0.5, **b, worker_node="n1"),
        ],
        ("utilization", "Step rate"): [_sample(1, **a)],
        ("utilization", "GPU utilization per node (NVML)"): [_sample(0.5, worker_node="n2")],
        ("utilization", "GPU memory used per GPU (NVML)"): [_sample(0.25, job="trainers", gpu="0", **a1)],
        ("cost", "OpenCost GPU price of the jobs' nodes"): [
            _sample(2.5, **a, worker_node="n1"),
            _sample(1.5, **a, worker_node="n2"),
            _sample(2.5, **b, worker_node="n1"),
        ],
        # 2 GPUs at the mean price of a's nodes, (2.5 + 1.5) / 2 USD per GPU-hour
        ("cost", "OpenCost vs kubetune, USD per hour"): [_sample(4, **a)],
        ("cost", "USD lost to preemption"): [_sample(0.075, **a)],  # 15 s at 0.005 USD/s
        ("cost", "Goodput USD"): [_sample(0.3, **a)],
        ("cost", "USD per 1M tokens"): [_sample(500, **a)],
    }
    other = f"round({expr('utilization', 'Goodput breakdown', 'B')}, 0.001)"  # 100 - 60 - 10 - 5 - 15
    tests = [
        {
            "name": "dashboard joins",
            "interval": "15s",
            "input_series": series,
            "promql_expr_test": [
                # rounded: rate() extrapolates in floating point (0.9999999999999999 steps/s)
                {"expr": f"round({expr(board, title)}, 0.001)", "eval_time": "5m", "exp_samples": samples}
                for (board, title), samples in cases.items()
            ]
            + [{"expr": other, "eval_time": "5m", "exp_samples": [_sample(10, **a), _sample(0, **b)]}]
            + [  # one job selected: the other's series stay out
                {
                    "expr": expr("utilization", "GPU utilization per job (DCGM)", finetunejob="b"),
                    "eval_time": "5m",
                    "exp_samples": [_sample(0.25, **b)],
                }
            ],
        }
    ]
    (tmp_path / "joins.yaml").write_text(yaml.safe_dump({"rule_files": [], "tests": tests}, sort_keys=False))
    out = promtool("test", "rules", "joins.yaml", cwd=tmp_path)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
