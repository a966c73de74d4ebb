"""The chart's alerting rules as a plain Prometheus rules file: the PrometheusRule that the real
`helm` renders, unwrapped to its spec (`groups:`). For promtool in the tests, and for a Prometheus
without the prometheus-operator (the local stack), which then names the operator's scrape job."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from kubetune_dev.versions import REPO, binary

CHART = REPO / "charts" / "kubetune"
RELEASE, NAMESPACE = "kt", "kubetune-system"


def chart_rules(*helm_args: str, operator_job: str | None = None) -> dict[str, Any]:
    """{"groups": [...]} of the chart's PrometheusRule with the given extra `helm template` args.
    Without `operator_job` the ServiceMonitor is rendered too and its scrape job is watched."""
    args = ["--set", "metrics.prometheusRule.enabled=true"]
    if operator_job is None:
        args += ["--set", "metrics.serviceMonitor.enabled=true"]
    else:
        args += ["--set", f"metrics.prometheusRule.operatorJob={operator_job}"]
    out = subprocess.run(
        [str(binary("helm")), "template", RELEASE, str(CHART), "-n", NAMESPACE, *args, *helm_args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (rule,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "PrometheusRule"]
    return {"groups": rule["spec"]["groups"]}


def write_rules_file(path: Path, *helm_args: str, operator_job: str | None = None) -> Path:
    path.write_text(yaml.safe_dump(chart_rules(*helm_args, operator_job=operator_job), sort_keys=False))
    return path
