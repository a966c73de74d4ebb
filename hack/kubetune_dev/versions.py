"""Pinned versions (hack/versions.env), the build cache, and where the pinned binaries live.

hack/versions.env is the one place versions are written; hack/build-binaries.sh fills the cache
($KUBETUNE_CACHE, default ~/.cache/kubetune) with `bin/<target>-<version>/<binary>`.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

HACK = Path(__file__).resolve().parents[1]
REPO = HACK.parent

# binary -> (build-binaries.sh target, versions.env key); anything else is a Kubernetes binary
_TARGETS = {
    "etcd": ("etcd", "ETCD_VERSION"),
    "kwok": ("kwok", "KWOK_VERSION"),
    "minio": ("minio", "MINIO_VERSION"),
    "helm": ("helm", "HELM_VERSION"),
    "prometheus": ("prometheus", "PROMETHEUS_VERSION"),
    "promtool": ("prometheus", "PROMETHEUS_VERSION"),
}


def versions(path: Path = HACK / "versions.env") -> dict[str, str]:
    """hack/versions.env (KEY=value lines), the one place pinned versions live."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip().strip('"')
    return out


def project_version() -> str:
    """The Python package's version (pyproject.toml): also the images' tag."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def kubernetes_bin_dir() -> Path:
    """Where the pinned Kubernetes build (kubelet, kube-proxy, ..., pause.c) lives."""
    return cache_dir() / "bin" / f"kubernetes-{versions()['KUBERNETES_VERSION']}"


def binary(name: str) -> Path:
    """Find a pinned binary: $KUBEBUILDER_ASSETS first, then the build cache (building it if absent)."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and (Path(assets) / name).exists():
        return Path(assets) / name
    target, key = _TARGETS.get(name, ("kubernetes", "KUBERNETES_VERSION"))
    path = cache_dir() / "bin" / f"{target}-{versions()[key]}" / name
    if not path.exists():
        subprocess.run([str(HACK / "build-binaries.sh"), target], check=True)
    return path


def monitoring_crds() -> list[Path]:
    """The prometheus-operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs (pinned), fetched if absent."""
    out = cache_dir() / "bin" / f"monitoring-crds-{versions()['PROMETHEUS_OPERATOR_VERSION']}"
    if not (out / "monitoring.coreos.com_prometheusrules.yaml").exists():
        subprocess.run([str(HACK / "build-binaries.sh"), "monitoring-crds"], check=True)
    return sorted(out.glob("monitoring.coreos.com_*.yaml"))
