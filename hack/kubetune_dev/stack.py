"""Everything `make demo` and the end-to-end tests run on: a real single-node cluster (the
control plane from `kubetune_dev.controlplane`, a real kubelet + containerd node from
`kubetune_dev.node`), the operator and trainer images built with buildah (hack/images.sh) and
loaded into the node, MinIO on the host's IP (reachable from pods), the Helm chart installed
with the real `helm`, and a real Prometheus on the host that discovers the operator and trainer
pods as the chart's ServiceMonitor/PodMonitor would and evaluates the chart's alerts
(`kubetune_dev.stack_monitoring`).

    python -m kubetune_dev.stack [--state-dir DIR]    # bring it up; Ctrl-C tears it down

With a kubeconfig (`LocalStack(kubeconfig=...)`, e.g. kind) it uses that cluster instead of
booting one: images must already be loaded there (hack/kind-e2e.sh does `kind load`), and
MinIO still runs on this host, so pods must be able to reach this host's IP.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_dev import controlplane
from kubetune_dev.host import host_ip
from kubetune_dev.node import LocalNode
from kubetune_dev.s3server import MinioServer
from kubetune_dev.stack_monitoring import stack_prometheus
from kubetune_dev.tiny_model import build_tiny_model, instruction_records, write_jsonl
from kubetune_dev.versions import HACK, REPO, binary, cache_dir, project_version

RELEASE = "kubetune"
SYSTEM_NAMESPACE = "kubetune-system"


def default_state_dir() -> Path:
    """One state dir for the demo, the e2e tests and the benchmarks: the node's containerd keeps
    the 6 GB trainer image unpacked there, so every run after the first reuses it (and a new
    run stops whatever an earlier one left running, since only one node fits on a host)."""
    return cache_dir() / "localstack"


def log(msg: str) -> None:
    print(f"[localstack] {msg}", file=sys.stderr, flush=True)


@dataclass
class LocalStack:
    state_dir: Path
    kubeconfig: Path | None = None  # an existing cluster; None boots the local one
    node_labels: dict[str, str] = field(default_factory=lambda: {"karpenter.sh/capacity-type": "spot"})
    progress_poll_seconds: float = 2.0
    cp: controlplane.ControlPlane | None = None
    node: LocalNode | None = None
    minio: Any = None  # a MinioServer once up
    prometheus: Any = None  # a PrometheusServer once up
    timings: dict[str, float] = field(default_factory=dict)
    _generation: int = 0

    # ---- bring-up ---------------------------------------------------------------------------
    def up(self) -> LocalStack:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.stop_leftovers()
        t0 = time.monotonic()
        if self.kubeconfig is None:
            # A fresh cluster every time (stale Nodes and jobs of an earlier run would confuse
            # this one); the caches that matter (pki, the node's image store) are kept.
            shutil.rmtree(self.state_dir / "control-plane" / "etcd", ignore_errors=True)
            self.cp = controlplane.ControlPlane(self.state_dir / "control-plane").start()
            self.kubeconfig = self.cp.kubeconfig
            self.timings["control_plane_s"] = time.monotonic() - t0
            t1 = time.monotonic()
            self.start_node()
            self.timings["node_s"] = time.monotonic() - t1
            t1 = time.monotonic()
            self.load_images()
            self.timings["images_s"] = time.monotonic() - t1
        t1 = time.monotonic()
        self.start_minio()
        self.start_prometheus()
        self.install_chart()
        self.timings["chart_s"] = time.monotonic() - t1
        self.timings["total_s"] = time.monotonic() - t0
        log("up: " + ", ".join(f"{k}={v:.1f}" for k, v in self.timings.items()))
        return self

    def start_node(self) -> None:
        assert self.cp is not None
        self.node = LocalNode(
            self.state_dir, self.cp.pki / "ca.crt", self.cp.pki / "ca.key", self.cp.server, node_labels=self.node_labels
        )
        self.node.start()
        self.node.wait_ready()

    def replace_node(self) -> None:
        """A spot VM reclaimed and replaced: everything on it dies at once (no SIGTERM), then a
        new node with a new name joins. Deleting the old Node object is the caller's move."""
        assert self.node is not None and self.cp is not None
        self.node.stop()
        self._generation += 1
        self.node = LocalNode(
            self.state_dir,
            self.cp.pki / "ca.crt",
            self.cp.pki / "ca.key",
            self.cp.server,
            node_name=f"kubetune-node-{self._generation}",
            node_labels=self.node_labels,
        )
        self.node.start()
        self.node.wait_ready()

    def load_images(self) -> None:
        """Build (cached layers) and load the operator and trainer images into the node."""
        assert self.node is not None
        # --state-dir: the node remembers what it imported, so an unchanged 6 GB trainer image
        # is not imported again (a minute saved on every warm run).
        subprocess.run(
            [str(HACK / "images.sh"), "--state-dir", str(self.state_dir), "base", "operator", "trainer"], check=True
        )

    def start_minio(self) -> None:
        host = host_ip()  # not 127.0.0.1: pods reach the host through the bridge
        self.minio = MinioServer(host=host, data_dir=self.state_dir / "minio", log_path=self.state_dir / "minio.log")
        self.minio.start()
        (self.state_dir / "minio.pid").write_text(str(self.minio.proc.pid))
        log(f"MinIO at {self.minio.endpoint}")

    def start_prometheus(self) -> None:
        """Prometheus on 127.0.0.1, scraping the pods by their IPs (the host routes the pod CIDR to
        the node's bridge) every second; a fresh TSDB per stack."""
        assert self.kubeconfig is not None
        work = self.state_dir / "prometheus"
        shutil.rmtree(work, ignore_errors=True)
        self.prometheus = stack_prometheus(RELEASE, SYSTEM_NAMESPACE, self.kubeconfig, work).start()
        (self.state_dir / "prometheus.pid").write_text(str(self.prometheus.proc.pid))
        (self.state_dir / "prometheus.url").write_text(self.prometheus.url)
        log(f"Prometheus at {self.prometheus.url}")

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [str(binary("helm")), "--kubeconfig", str(self.kubeconfig), *args], capture_output=True, text=True
        )
        if check and out.returncode:
            raise RuntimeError(f"helm {args[0]} failed ({out.returncode}):\n{out.stderr}{out.stdout[-2000:]}")
        return out

    def install_chart(self) -> None:
        version = project_version()
        out = self.helm(
            "upgrade",
            "--install",
            RELEASE,
            str(REPO / "charts" / "kubetune"),
            "-n",
            SYSTEM_NAMESPACE,
            "--create-namespace",
            "--set",
            f"operator.image.tag={version}",
            "--set",
            "operator.image.pullPolicy=Never",
            "--set",
            f"trainer.image=localhost/kubetune-trainer:{version}",
            "--set",
            "trainer.pullPolicy=Never",
            "--set-json",
            f"progressPollSeconds={self.progress_poll_seconds}",
            "--wait",
            "--timeout",
            "5m",
        )
        log(out.stdout.strip().splitlines()[0] if out.stdout else "chart installed")

    # ---- helpers ----------------------------------------------------------------------------
    def api(self):
        import kubernetes

        return kubernetes.config.new_client_from_config(str(self.kubeconfig))

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(binary("kubectl")), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            check=check,
        )

    def s3_secret(self, namespace: str, name: str = "kubetune-demo-s3") -> None:
        """The credentials Secret a FineTuneJob names (MinIO's root keys, for the demo)."""
        import kubernetes
        from kubernetes.client.rest import ApiException

        core = kubernetes.client.CoreV1Api(self.api())
        body = {"metadata": {"name": name}, "stringData": self.minio.env()}
        try:
            core.create_namespaced_secret(namespace, body)
        except ApiException as e:
            if e.status != 409:
                raise
            core.replace_namespaced_secret(name, namespace, body)

    def seed_demo_data(
        self, bucket: str = "kubetune-demo", records: int = 600, hidden: int = 64, layers: int = 2
    ) -> dict[str, str]:
        """A tiny Llama (random weights, tokenizer trained here) and an instruction dataset, in MinIO."""
        import tempfile

        from kubetune_trainer import s3 as s3lib

        client = self.minio.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = build_tiny_model(Path(tmp) / "tiny-llama", hidden=hidden, layers=layers)
            s3lib.upload_dir(client, model_dir, f"s3://{bucket}/models/tiny-llama")
            data = write_jsonl(Path(tmp) / "instructions.jsonl", instruction_records(records, seed=7))
            s3lib.upload_file(client, data, f"s3://{bucket}/datasets/instructions.jsonl")
        return {"model": f"s3://{bucket}/models/tiny-llama", "dataset": f"s3://{bucket}/datasets/instructions.jsonl"}

    def operator_logs(self) -> str:
        return self.kubectl(
            "-n", SYSTEM_NAMESPACE, "logs", f"deploy/{RELEASE}-operator", "--tail=400", check=False
        ).stdout

    # ---- tear-down --------------------------------------------------------------------------
    def stop_leftovers(self) -> None:
        """Stop what an earlier run on this state dir left running (the demo keeps its cluster up)."""
        import signal

        for name in ("minio.pid", "prometheus.pid"):
            pid_file = self.state_dir / name
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                    time.sleep(1)
                except (ProcessLookupError, ValueError):
                    pass
                pid_file.unlink()
        if self.kubeconfig is None:
            if (self.state_dir / "node" / "node.json").exists():
                LocalNode(
                    self.state_dir,
                    self.state_dir / "control-plane" / "pki" / "ca.crt",
                    self.state_dir / "control-plane" / "pki" / "ca.key",
                    "https://127.0.0.1:1",
                ).stop()
            controlplane.stop_from_pidfiles(self.state_dir / "control-plane")

    def down(self) -> None:
        if self.prometheus is not None:
            self.prometheus.stop()  # its TSDB and log stay in state_dir/prometheus until the next up
            (self.state_dir / "prometheus.pid").unlink(missing_ok=True)
        if self.minio is not None:
            self.minio.stop(remove_data=False)
        if self.node is not None:
            self.node.stop()
        if self.cp is not None:
            self.cp.stop()
        log(f"down; logs in {self.state_dir / 'logs'} and {self.state_dir / 'control-plane' / 'logs'}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="bring the local stack up (Ctrl-C tears it down)")
    ap.add_argument("--state-dir", type=Path, default=default_state_dir())
    args = ap.parse_args(argv)
    kubeconfig = os.environ.get("KUBETUNE_KUBECONFIG")
    stack = LocalStack(args.state_dir, Path(kubeconfig) if kubeconfig else None).up()
    print(
        json.dumps(
            {"kubeconfig": str(stack.kubeconfig), "minio": stack.minio.endpoint, "prometheus": stack.prometheus.url}
        ),
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stack.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
