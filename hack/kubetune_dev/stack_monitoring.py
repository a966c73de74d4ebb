"""The local stack's Prometheus: what the chart's ServiceMonitor, PodMonitor and PrometheusRule
would have a prometheus-operator set up, without a prometheus-operator.

The real `helm template` renders the chart with its monitors and rules enabled (the release and
namespace the stack installs, a 1 s interval); `scrape_configs` turns each rendered monitor into a
plain Prometheus scrape config that discovers the pods through `kubernetes_sd_configs` (role pod,
the stack's kubeconfig) with the relabelings the prometheus-operator generates for it: the
monitor's selector and port kept, the `namespace`/`pod`/`container`/`endpoint` target labels, its
`job` (a ServiceMonitor: the Service's name; a PodMonitor: `<namespace>/<name>`) and the
monitor's own relabelings (the PodMonitor's finetunejob, job_namespace, worker_pod, worker_node).
The PrometheusRule's spec.groups become the rule file. Only what the chart's monitors use is
translated (matchLabels selectors, named ports, replace relabelings); anything else is an error.

A ServiceMonitor is scraped through its Service's endpoints by the prometheus-operator; here the
pods are found directly (role pod, the Service's selector, the container port the Service's
targetPort names), which selects the same pods and gives the same target labels.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from kubetune_dev.prometheus import PrometheusServer
from kubetune_dev.versions import REPO, binary

CHART = REPO / "charts" / "kubetune"
INTERVAL = "1s"


def render(release: str, namespace: str, *helm_args: str, interval: str = INTERVAL) -> list[dict[str, Any]]:
    """The chart's documents with the ServiceMonitor, PodMonitor and PrometheusRule enabled."""
    args = [
        *("--set", "metrics.serviceMonitor.enabled=true", "--set", f"metrics.serviceMonitor.interval={interval}"),
        *("--set", "metrics.podMonitor.enabled=true", "--set", f"metrics.podMonitor.interval={interval}"),
        *("--set", "metrics.prometheusRule.enabled=true"),
    ]
    out = subprocess.run(
        [str(binary("helm")), "template", release, str(CHART), "-n", namespace, *args, *helm_args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _label(name: str) -> str:
    """A Kubernetes label name as it appears in a __meta_kubernetes_pod_label_* name."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _keep_labels(match: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "action": "keep",
            "source_labels": [f"__meta_kubernetes_pod_label{kind}_{_label(k)}" for kind in ("", "present")],
            "regex": f"({re.escape(v)});true",
        }
        for k, v in sorted(match.items())
    ]


def _relabeling(r: dict[str, Any]) -> dict[str, Any]:
    if r.get("action", "replace").lower() != "replace":
        raise ValueError(f"relabeling {r} is not translated (only replace)")
    out: dict[str, Any] = {"action": "replace", "source_labels": r["sourceLabels"], "target_label": r["targetLabel"]}
    for key in ("regex", "replacement", "separator"):
        if key in r:
            out[key] = r[key]
    return out


def _common(job: str, port: str, endpoint: dict[str, Any], namespaces: list[str] | None, kubeconfig: Path) -> dict:
    sd: dict[str, Any] = {"role": "pod", "kubeconfig_file": str(kubeconfig)}
    if namespaces:
        sd["namespaces"] = {"names": namespaces}
    interval = endpoint.get("interval") or INTERVAL
    return {
        "job_name": job,
        "scrape_interval": interval,
        "scrape_timeout": endpoint.get("scrapeTimeout") or interval,
        "metrics_path": endpoint.get("path", "/metrics"),
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "kubernetes_sd_configs": [sd],
        "relabel_configs": [
            # what the prometheus-operator drops: finished pods, and every port but the monitor's
            {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
            {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": port},
        ],
    }


def _targets(job_label: str, port: str) -> list[dict[str, Any]]:
    """The target labels the prometheus-operator sets on every monitor's targets."""
    meta = {"namespace": "namespace", "container": "pod_container_name", "pod": "pod_name"}
    copy = (
        {"action": "replace", "source_labels": [f"__meta_kubernetes_{m}"], "target_label": t} for t, m in meta.items()
    )
    return [
        *copy,
        {"action": "replace", "target_label": "job", "replacement": job_label},
        {"action": "replace", "target_label": "endpoint", "replacement": port},
    ]


def _namespaces(selector: dict[str, Any], default: str) -> list[str] | None:
    if selector.get("any"):
        return None
    return list(selector.get("matchNames") or [default])


def scrape_configs(docs: list[dict[str, Any]], kubeconfig: Path) -> list[dict[str, Any]]:
    """A Prometheus scrape config per endpoint of every rendered ServiceMonitor and PodMonitor."""
    out: list[dict[str, Any]] = []
    services = [d for d in docs if d["kind"] == "Service"]
    for mon in (d for d in docs if d["kind"] == "ServiceMonitor"):
        ns = mon["metadata"]["namespace"]
        names = _namespaces(mon["spec"].get("namespaceSelector") or {}, ns)
        want = mon["spec"]["selector"]["matchLabels"]
        for svc in services:
            labels = svc["metadata"].get("labels") or {}
            if any(labels.get(k) != v for k, v in want.items()):
                continue
            if names and svc["metadata"]["namespace"] not in names:
                continue
            for i, ep in enumerate(mon["spec"]["endpoints"]):
                (svc_port,) = [p for p in svc["spec"]["ports"] if p.get("name") == ep["port"]]
                target_port = svc_port.get("targetPort", svc_port["port"])
                if not isinstance(target_port, str):
                    raise ValueError(f"Service {svc['metadata']['name']}: a numbered targetPort is not translated")
                cfg = _common(f"serviceMonitor/{ns}/{mon['metadata']['name']}/{i}", target_port, ep, names, kubeconfig)
                cfg["relabel_configs"] += _keep_labels(svc["spec"]["selector"])
                cfg["relabel_configs"] += _targets(svc["metadata"]["name"], ep["port"])
                cfg["relabel_configs"].append(
                    {"action": "replace", "target_label": "service", "replacement": svc["metadata"]["name"]}
                )
                cfg["relabel_configs"] += [_relabeling(r) for r in ep.get("relabelings") or []]
                out.append(cfg)
    for mon in (d for d in docs if d["kind"] == "PodMonitor"):
        ns, name = mon["metadata"]["namespace"], mon["metadata"]["name"]
        names = _namespaces(mon["spec"].get("namespaceSelector") or {}, ns)
        for i, ep in enumerate(mon["spec"]["podMetricsEndpoints"]):
            cfg = _common(f"podMonitor/{ns}/{name}/{i}", ep["port"], ep, names, kubeconfig)
            cfg["relabel_configs"] += _keep_labels(mon["spec"]["selector"]["matchLabels"])
            cfg["relabel_configs"] += _targets(f"{ns}/{name}", ep["port"])
            cfg["relabel_configs"] += [_relabeling(r) for r in ep.get("relabelings") or []]
            out.append(cfg)
    return out


def rule_groups(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """{"groups": [...]}: the rendered PrometheusRule's spec, a plain rules file."""
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return {"groups": rule["spec"]["groups"]}


def stack_prometheus(
    release: str, namespace: str, kubeconfig: Path, work_dir: Path, *helm_args: str, host: str = "127.0.0.1"
) -> PrometheusServer:
    """A PrometheusServer (not started) scraping the chart's operator and trainer pods in the cluster of
    `kubeconfig`, with the chart's alerts loaded; its config, rules, TSDB and log in `work_dir`."""
    docs = render(release, namespace, *helm_args)
    work_dir.mkdir(parents=True, exist_ok=True)
    rules = work_dir / "kubetune-rules.yaml"
    rules.write_text(yaml.safe_dump(rule_groups(docs), sort_keys=False))
    return PrometheusServer(
        scrape_configs=scrape_configs(docs, kubeconfig),
        scrape_interval=INTERVAL,
        rule_files=[rules],
        host=host,
        work_dir=work_dir,
    )
