"""kwok: simulated kubelets for fake nodes (heartbeats, pods Running with an IP, graceful
deletions completed), with the real scheduler and controllers. Cluster tests and bench/ use it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from kubetune_dev.procs import free_port
from kubetune_dev.versions import binary

FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")


def start_kwok(kubeconfig: Path, work_dir: Path, *, all_nodes: bool = False) -> subprocess.Popen:
    """kwok against `kubeconfig`, managing every node (`all_nodes`) or only those annotated
    FAKE_NODE_ANNOTATION; config and log (kwok.yaml, kwok.log) in `work_dir`."""
    config = work_dir / "kwok.yaml"
    config.write_text("")  # built-in default stages; no ~/.kwok lookup
    select = (
        ["--manage-all-nodes=true"]
        if all_nodes
        else ["--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=" + "=".join(FAKE_NODE_ANNOTATION)]
    )
    with open(work_dir / "kwok.log", "ab") as log:
        return subprocess.Popen(
            [
                str(binary("kwok")),
                f"--kubeconfig={kubeconfig}",
                f"--config={config}",
                *select,
                "--cidr=10.244.0.1/16",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def fake_node_manifest(
    name: str, spot: bool = False, gpus: int = 0, gpu_type: str | None = None, cpu: str = "16", memory: str = "64Gi"
) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": name,
        "type": "kwok",
        "karpenter.sh/capacity-type": "spot" if spot else "on-demand",
    }
    if gpu_type:
        labels["nvidia.com/gpu.product"] = gpu_type
    capacity = {"cpu": cpu, "memory": memory, "pods": "110"}
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {FAKE_NODE_ANNOTATION[0]: FAKE_NODE_ANNOTATION[1]}},
        "spec": {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }
