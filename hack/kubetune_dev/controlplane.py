"""A real Kubernetes control plane from upstream binaries: etcd, kube-apiserver,
kube-controller-manager (garbage collection, node lifecycle) and kube-scheduler.

Used by the pytest fixtures (tests/fixtures/control_plane.py), `make demo` and the benchmarks.

    python -m kubetune_dev.controlplane up [--state-dir DIR]    # start, print the kubeconfig path, keep running
    python -m kubetune_dev.controlplane down [--state-dir DIR]  # stop what `up` started

Binaries come from $KUBEBUILDER_ASSETS (the envtest convention: etcd, kube-apiserver, and
optionally kube-controller-manager/kube-scheduler/kubectl) or from the cache that
hack/build-binaries.sh fills (built on demand). State dir layout:
    pki/ (ca.*, apiserver.*, admin.*, sa.*)   kubeconfig   logs/<component>.log   etcd/   pids/<component>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import ssl
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_dev import pki as pkilib
from kubetune_dev.host import host_ip
from kubetune_dev.procs import Processes, free_port
from kubetune_dev.versions import binary, cache_dir

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
ADMIN_USER = "kubetune-admin"
# start order; stopped in reverse (an apiserver whose etcd is gone hangs instead of exiting)
COMPONENTS = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]


def create_namespace(core: Any, name: str, timeout: float = 60) -> None:
    """Create a namespace and wait for its default ServiceAccount (pods are refused until the
    ServiceAccount controller has made it)."""
    from kubernetes.client.rest import ApiException

    core.create_namespace({"metadata": {"name": name}})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            core.read_namespaced_service_account("default", name)
            return
        except ApiException:
            time.sleep(0.1)
    raise TimeoutError(f"no default ServiceAccount in namespace {name} after {timeout}s")


def make_pki(pki: Path, sans: list[str]) -> None:
    """CA, apiserver serving cert, admin client cert and the service-account key pair (made once)."""
    ca, ca_key = pkilib.make_ca(pki)
    if (pki / "admin.crt").exists():
        return
    pkilib.issue_cert(pki, "apiserver", ca, ca_key, cn="kube-apiserver", client=False, server=True, sans=sans)
    pkilib.issue_cert(pki, "admin", ca, ca_key, cn=ADMIN_USER, orgs=("system:masters",))
    pkilib.make_service_account_keys(pki)


def _processes(state_dir: Path) -> Processes:
    return Processes(state_dir / "logs", state_dir / "pids")


def stop_from_pidfiles(state_dir: Path, timeout: float = 20) -> None:
    """Stop a control plane started by another process, clients first and etcd last, each
    waited for."""
    procs = _processes(state_dir)
    for name in reversed(COMPONENTS):
        procs.stop(name, timeout)


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler as child processes."""

    state_dir: Path
    with_controllers: bool = True
    audit: bool = False  # log every request's metadata to logs/audit.log (benchmarks count requests)
    api_port: int = 0
    advertise_ip: str = ""
    procs: Processes = field(init=False)

    def __post_init__(self) -> None:
        self.procs = _processes(self.state_dir)

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def server(self) -> str:
        """The URL pods and a node use (the host's IP, not 127.0.0.1)."""
        return f"https://{self.advertise_ip}:{self.api_port}"

    def start(self, timeout: float = 120) -> ControlPlane:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        stop_from_pidfiles(self.state_dir)  # leftovers of an earlier run on this state dir
        self.advertise_ip = host_ip()
        sans = sorted(
            {
                "127.0.0.1",
                self.advertise_ip,
                SERVICE_IP,
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            }
        )
        make_pki(self.pki, sans)
        etcd_port, peer_port = free_port(), free_port()
        self.api_port = free_port()
        self.procs.start(
            "etcd",
            [
                str(binary("etcd")),
                "--data-dir",
                str(self.state_dir / "etcd"),
                "--name",
                "kubetune",
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"kubetune=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes",
                str(4 << 30),
                "--log-level",
                "warn",
            ],
        )
        p = str(self.pki)
        self.procs.start(
            "kube-apiserver",
            [
                str(binary("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--secure-port={self.api_port}",
                "--bind-address=0.0.0.0",
                f"--advertise-address={self.advertise_ip}",
                f"--tls-cert-file={p}/apiserver.crt",
                f"--tls-private-key-file={p}/apiserver.key",
                f"--client-ca-file={p}/ca.crt",
                f"--service-account-key-file={p}/sa.pub",
                f"--service-account-signing-key-file={p}/sa.key",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                f"--kubelet-client-certificate={p}/admin.crt",
                f"--kubelet-client-key={p}/admin.key",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--enable-priority-and-fairness=false",
                "--max-requests-inflight=2000",
                "--max-mutating-requests-inflight=1000",
                "--watch-cache=true",
                *self._audit_flags(),
            ],
        )
        self._write_kubeconfig(self.kubeconfig, "admin", ADMIN_USER)
        self.wait_ready(timeout)
        if self.with_controllers and self._have("kube-controller-manager"):
            self.procs.start(
                "kube-controller-manager",
                [
                    str(binary("kube-controller-manager")),
                    *self._controller_flags(),
                    f"--service-account-private-key-file={p}/sa.key",
                    f"--root-ca-file={p}/ca.crt",
                    f"--cluster-signing-cert-file={p}/ca.crt",
                    f"--cluster-signing-key-file={p}/ca.key",
                    "--use-service-account-credentials=true",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--controllers=*,-bootstrapsigner,-tokencleaner",
                    # Delete pods of a vanished node quickly (a spot reclaim deletes the Node object).
                    "--node-monitor-grace-period=20s",
                    "--terminated-pod-gc-threshold=1000",
                ],
            )
        if self.with_controllers and self._have("kube-scheduler"):
            self.procs.start(
                "kube-scheduler",
                [
                    str(binary("kube-scheduler")),
                    *self._controller_flags(),
                ],
            )
        return self

    def _write_kubeconfig(self, path: Path, cert: str, user: str) -> Path:
        return pkilib.write_kubeconfig(
            path,
            f"https://127.0.0.1:{self.api_port}",
            self.pki / "ca.crt",
            self.pki / f"{cert}.crt",
            self.pki / f"{cert}.key",
            user,
        )

    def _controller_flags(self) -> list[str]:
        """What the controller-manager and the scheduler share: the admin kubeconfig for everything, no leader
        election (one of each), a free loopback port for their own HTTPS endpoint."""
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            f"--secure-port={free_port()}",
            "--bind-address=127.0.0.1",
        ]

    def _audit_flags(self) -> list[str]:
        if not self.audit:
            return []
        policy = self.state_dir / "audit-policy.json"
        policy.write_text(
            json.dumps(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": [{"level": "Metadata"}],
                }
            )
        )
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.logs / 'audit.log'}",
            "--audit-log-mode=blocking",
        ]

    def client_kubeconfig(self, user: str, group: str = "system:masters") -> Path:
        """A kubeconfig for a distinct user, so its requests can be told apart in the audit log."""
        path = self.state_dir / f"kubeconfig-{user}"
        if not path.exists():
            pkilib.issue_cert(self.pki, user, self.pki / "ca.crt", self.pki / "ca.key", cn=user, orgs=(group,))
            self._write_kubeconfig(path, user, user)
        return path

    @staticmethod
    def _have(name: str) -> bool:
        assets = os.environ.get("KUBEBUILDER_ASSETS")
        return not assets or (Path(assets) / name).exists() or name not in ("kube-controller-manager", "kube-scheduler")

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"https://127.0.0.1:{self.api_port}/readyz"
        last = ""
        while time.monotonic() < deadline:
            for name in self.procs.exited():
                code = self.procs.children[name].returncode
                raise RuntimeError(f"{name} exited with {code}; see {self.procs.log_path(name)}")
            try:
                with urllib.request.urlopen(url, context=self._ssl(), timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"kube-apiserver not ready after {timeout}s ({last}); logs in {self.logs}")

    def stop(self) -> None:
        for name in reversed(list(self.procs.children)):  # clients first, etcd last
            self.procs.stop(name)
        shutil.rmtree(self.state_dir / "pids", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("command", choices=["up", "down"])
    ap.add_argument("--state-dir", type=Path, default=cache_dir() / "localcluster")
    args = ap.parse_args(argv)
    if args.command == "down":
        stop_from_pidfiles(args.state_dir)
        return 0
    cp = ControlPlane(args.state_dir).start()
    print(f"control plane up: KUBECONFIG={cp.kubeconfig} (logs in {cp.logs}); Ctrl-C stops it", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
