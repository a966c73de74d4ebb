#!/usr/bin/env python3
"""A real Kubernetes control plane from upstream binaries: etcd, kube-apiserver,
kube-controller-manager (garbage collection, node lifecycle) and kube-scheduler.

Used by the pytest fixtures (tests/fixtures/control_plane.py), `make demo` and the benchmarks.

    python hack/localcluster.py up [--state-dir DIR]    # start, print the kubeconfig path, keep running
    python hack/localcluster.py down [--state-dir DIR]  # stop what `up` started

Binaries come from $KUBEBUILDER_ASSETS (the envtest convention: etcd, kube-apiserver, and
optionally kube-controller-manager/kube-scheduler/kubectl) or from the cache that
hack/build-binaries.sh fills (built on demand). State dir layout:
    pki/ (ca.crt, ca.key, apiserver.*, admin.*, sa.*)   kubeconfig   logs/<component>.log   etcd/
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service


def versions(path: Path = HACK / "versions.env") -> dict[str, str]:
    """hack/versions.env (KEY=value lines), the one place pinned versions live."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip().strip('"')
    return out


def create_namespace(core, name: str, timeout: float = 60) -> None:
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


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def binary(name: str) -> Path:
    """Find a pinned binary: $KUBEBUILDER_ASSETS first, then the build cache (building it if absent)."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and (Path(assets) / name).exists():
        return Path(assets) / name
    v = versions()
    target, version = {
        "etcd": ("etcd", v["ETCD_VERSION"]),
        "kwok": ("kwok", v["KWOK_VERSION"]),
        "minio": ("minio", v["MINIO_VERSION"]),
        "helm": ("helm", v["HELM_VERSION"]),
        "prometheus": ("prometheus", v["PROMETHEUS_VERSION"]),
    }.get(name, ("kubernetes", v["KUBERNETES_VERSION"]))
    path = cache_dir() / "bin" / f"{target}-{version}" / name
    if not path.exists():
        subprocess.run([str(HACK / "build-binaries.sh"), target], check=True)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def host_ip() -> str:
    """The address pods on a local node (and in-cluster clients) use to reach the apiserver."""
    try:
        out = subprocess.run(["ip", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True, check=True).stdout
        return out.split(" src ")[1].split()[0]
    except (subprocess.CalledProcessError, IndexError, FileNotFoundError):
        return "127.0.0.1"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


_CLIENT_EXT = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"


def _issue(pki: Path, name: str, subject: str, ext: str) -> None:
    """A key and a certificate signed by the cluster CA."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject, cwd=pki)
    (pki / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "3650", "-extfile", f"{name}.ext", cwd=pki)


def issue_client_cert(pki: Path, user: str, group: str) -> None:
    _issue(pki, user, f"/O={group}/CN={user}", _CLIENT_EXT)


def make_pki(pki: Path, sans: list[str]) -> None:
    """CA, apiserver serving cert, admin client cert and the service-account key pair (idempotent)."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "admin.crt").exists():
        return
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "3650", "-subj", "/CN=kubetune-local-ca", cwd=pki)
    alt = ",".join(f"IP:{s}" if s.replace(".", "").isdigit() else f"DNS:{s}" for s in sans)
    _issue(pki, "apiserver", "/CN=kube-apiserver",
           f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
           f"extendedKeyUsage=serverAuth\nsubjectAltName={alt}\n")
    issue_client_cert(pki, "kubetune-admin", "system:masters")
    for ext in ("crt", "key"):  # the admin identity's files keep their short names
        (pki / f"kubetune-admin.{ext}").rename(pki / f"admin.{ext}")
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, server: str, pki: Path, cert: str = "admin", context: str = "kubetune-local") -> None:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")}}],
        "users": [{"name": cert, "user": {"client-certificate-data": b64(f"{cert}.crt"),
                                          "client-key-data": b64(f"{cert}.key")}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": cert}}],
        "current-context": context,
    }
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML; no yaml dependency here


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler as child processes."""

    state_dir: Path
    with_controllers: bool = True
    audit: bool = False  # log every request's metadata to logs/audit.log (benchmarks count requests)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    api_port: int = 0
    advertise_ip: str = ""

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
        return f"https://{self.advertise_ip}:{self.api_port}"

    def _spawn(self, name: str, argv: list[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        # Own process group: a Ctrl-C to the parent must not kill etcd before the apiserver.
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        (self.state_dir / "pids").mkdir(exist_ok=True)
        (self.state_dir / "pids" / name).write_text(str(self.procs[name].pid))

    def start(self, timeout: float = 120) -> "ControlPlane":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        stop_from_pidfiles(self.state_dir)  # leftovers of an earlier run on this state dir
        self.advertise_ip = host_ip()
        sans = sorted({"127.0.0.1", self.advertise_ip, SERVICE_IP, "localhost", "kubernetes", "kubernetes.default",
                       "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"})
        make_pki(self.pki, sans)
        etcd_port, peer_port = free_port(), free_port()
        self.api_port = free_port()
        self._spawn("etcd", [
            str(binary("etcd")), "--data-dir", str(self.state_dir / "etcd"), "--name", "kubetune",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"kubetune=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--quota-backend-bytes", str(4 << 30), "--log-level", "warn",
        ])
        p = str(self.pki)
        self._spawn("kube-apiserver", [
            str(binary("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--secure-port={self.api_port}", "--bind-address=0.0.0.0", f"--advertise-address={self.advertise_ip}",
            f"--tls-cert-file={p}/apiserver.crt", f"--tls-private-key-file={p}/apiserver.key",
            f"--client-ca-file={p}/ca.crt",
            f"--service-account-key-file={p}/sa.pub", f"--service-account-signing-key-file={p}/sa.key",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            f"--kubelet-client-certificate={p}/admin.crt", f"--kubelet-client-key={p}/admin.key",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--enable-priority-and-fairness=false", "--max-requests-inflight=2000",
            "--max-mutating-requests-inflight=1000", "--watch-cache=true",
            *self._audit_flags(),
        ])
        write_kubeconfig(self.kubeconfig, f"https://127.0.0.1:{self.api_port}", self.pki)
        self.wait_ready(timeout)
        if self.with_controllers and self._have("kube-controller-manager"):
            self._spawn("kube-controller-manager", [
                str(binary("kube-controller-manager")), f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false", f"--secure-port={free_port()}", "--bind-address=127.0.0.1",
                f"--service-account-private-key-file={p}/sa.key", f"--root-ca-file={p}/ca.crt",
                f"--cluster-signing-cert-file={p}/ca.crt", f"--cluster-signing-key-file={p}/ca.key",
                "--use-service-account-credentials=true", f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--controllers=*,-bootstrapsigner,-tokencleaner",
                # Delete pods of a vanished node quickly (a spot reclaim deletes the Node object).
                "--node-monitor-grace-period=20s", "--terminated-pod-gc-threshold=1000",
            ])
        if self.with_controllers and self._have("kube-scheduler"):
            self._spawn("kube-scheduler", [
                str(binary("kube-scheduler")), f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false", f"--secure-port={free_port()}", "--bind-address=127.0.0.1",
            ])
        return self

    def _audit_flags(self) -> list[str]:
        if not self.audit:
            return []
        policy = self.state_dir / "audit-policy.json"
        policy.write_text(json.dumps({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                                      "omitStages": ["RequestReceived"], "rules": [{"level": "Metadata"}]}))
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.logs / 'audit.log'}", "--audit-log-mode=blocking"]

    def client_kubeconfig(self, user: str, group: str = "system:masters") -> Path:
        """A kubeconfig for a distinct user, so its requests can be told apart in the audit log."""
        path = self.state_dir / f"kubeconfig-{user}"
        if not path.exists():
            issue_client_cert(self.pki, user, group)
            write_kubeconfig(path, f"https://127.0.0.1:{self.api_port}", self.pki, cert=user)
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
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.logs / (name + '.log')}")
            try:
                with urllib.request.urlopen(url, context=self._ssl(), timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception as e:  # not up yet
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"kube-apiserver not ready after {timeout}s ({last}); logs in {self.logs}")

    def stop(self) -> None:
        # Reverse start order: clients first, etcd last.
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        shutil.rmtree(self.state_dir / "pids", ignore_errors=True)


def stop_from_pidfiles(state_dir: Path, timeout: float = 20) -> None:
    """Stop a control plane started by another process, clients first and etcd last, each
    waited for (an apiserver whose etcd is gone hangs instead of exiting)."""
    pids = state_dir / "pids"
    for name in ["kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]:
        f = pids / name
        if not f.exists():
            continue
        pid = int(f.read_text())
        try:
            if name not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                raise ProcessLookupError  # a stale pid file (reboot): that pid is someone else now
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, FileNotFoundError):
            pass
        f.unlink()


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
