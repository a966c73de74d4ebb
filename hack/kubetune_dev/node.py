"""A real local Kubernetes node: containerd + CNI bridge + kubelet + kube-proxy, as child processes.

The node half of kubetune's local cluster (`kubetune_dev.controlplane` runs the control plane).
Stdlib only; certificates come from `kubetune_dev.pki` (the `openssl` CLI); host packages from
Debian apt. Everything the node writes lives under ``<state_dir>/node/`` (logs in
``<state_dir>/logs/``), so it never collides with a system containerd or kubelet::

    node = LocalNode(state_dir, ca_cert, ca_key, "https://192.0.2.2:6443")
    node.start()                      # returns once the processes are launched
    node.wait_ready(timeout=180)      # Node Ready, kube-proxy healthy
    node.import_image("x.tar")        # docker-archive or OCI archive, into the CRI namespace
    node.stop()                       # idempotent; also cleans up after a crashed run

CLI: ``python -m kubetune_dev.node up|down|status --state-dir DIR ...``; images go in with
``python -m kubetune_dev.imagestore import --state-dir DIR ARCHIVE...`` (or ``hack/images.sh``).

The pause (sandbox) image is written by `kubetune_dev.imagestore` and imported at every start.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from kubetune_dev import imagestore
from kubetune_dev.containerd import CNI_BIN_DIR, Containerd
from kubetune_dev.host import (
    CAP_SYS_RESOURCE,
    ensure_packages,
    have_capability,
    host_ip_towards,
    log,
    overlay_supported,
    prepare_host,
    unmount_all,
)
from kubetune_dev.imagestore import build_pause_image
from kubetune_dev.pki import issue_cert, write_kubeconfig
from kubetune_dev.podnet import PodNetwork
from kubetune_dev.procs import Processes, http_ok, running
from kubetune_dev.versions import cache_dir, versions

CGROUP_V1 = Path("/sys/fs/cgroup")

# Debian packages the node needs: package -> a file it installs (present = skip apt).
APT_PACKAGES = {
    "containerd": "/usr/bin/containerd",
    "runc": "/usr/sbin/runc",
    "containernetworking-plugins": f"{CNI_BIN_DIR}/bridge",
    "iptables": "/usr/sbin/iptables",
    "conntrack": "/usr/sbin/conntrack",
    "iproute2": "/usr/sbin/ip",
    "kmod": "/usr/sbin/modprobe",
    "openssl": "/usr/bin/openssl",
    **imagestore.PAUSE_BUILD_PACKAGES,
}
COMPONENTS = ("containerd", "kubelet", "kube-proxy")
# kind's default pod CIDR; not podman/buildah's default network (10.88.0.0/16, cni-podman0), which a
# `buildah run` without --network host brings up on the host and which then swallows pod traffic.
POD_CIDR = "10.244.0.0/16"


class LocalNode:
    """One real node (containerd + kubelet + kube-proxy) joined to an existing control plane.

    Args:
        state_dir: the cluster state directory; the node uses ``<state_dir>/node/`` and writes
            logs to ``<state_dir>/logs/{containerd,kubelet,kube-proxy}.log``.
        ca_cert, ca_key: the cluster CA (PEM); node client/serving certs are signed with it.
        apiserver_url: ``https://<host-ip>:<port>`` — reachable from pods too (no 127.0.0.1).
        node_name: the Node object name (also names the cgroup root ``/<node_name>``).
        pod_cidr: the bridge network for pods (host-local IPAM); also kube-proxy's clusterCIDR.
        bin_dir: kubelet/kube-proxy binaries (default: the hack/versions.env Kubernetes build).
        node_ip: the IP the node registers with (default: our source IP towards the apiserver).
        images: extra image archives imported at every start (docker-archive or OCI archive).
        kubelet_port / kubelet_healthz_port / proxy_healthz_port / proxy_metrics_port: host ports.
    """

    def __init__(
        self,
        state_dir: str | Path,
        ca_cert: str | Path,
        ca_key: str | Path,
        apiserver_url: str,
        node_name: str = "kubetune-node",
        pod_cidr: str = POD_CIDR,
        *,
        bin_dir: str | Path | None = None,
        node_ip: str | None = None,
        images: Any = (),
        kubelet_port: int = 10250,
        kubelet_healthz_port: int = 10248,
        proxy_healthz_port: int = 10256,
        proxy_metrics_port: int = 10249,
        node_labels: dict[str, str] | None = None,
        verbosity: int = 2,
    ) -> None:
        self.versions = versions()
        self.state_dir = Path(state_dir).resolve()
        self.ca_cert, self.ca_key = Path(ca_cert).resolve(), Path(ca_key).resolve()
        self.apiserver_url = apiserver_url.rstrip("/")
        self.node_name = node_name
        self.pod_cidr = str(ipaddress.ip_network(pod_cidr))
        k8s = self.versions["KUBERNETES_VERSION"]
        self.bin_dir = Path(bin_dir) if bin_dir else cache_dir() / "bin" / f"kubernetes-{k8s}"
        self._node_ip = node_ip
        self.images = [Path(p) for p in images]
        self.kubelet_port, self.kubelet_healthz_port = kubelet_port, kubelet_healthz_port
        self.proxy_healthz_port, self.proxy_metrics_port = proxy_healthz_port, proxy_metrics_port
        self.node_labels = node_labels or {}
        self.verbosity = verbosity
        self.pause_image = self.versions.get("PAUSE_IMAGE", imagestore.DEFAULT_PAUSE_IMAGE)

        self.dir = self.state_dir / "node"
        self.log_dir = self.state_dir / "logs"
        self.pki = self.dir / "pki"
        self.kubelet_dir = self.dir / "kubelet"
        self.cgroup_root = "/" + node_name
        # pid files count only while the process's command line names this node's files
        self.procs = Processes(self.log_dir, self.dir / "run", pid_suffix=".pid", marker=str(self.dir))
        self.containerd = Containerd(self.dir, self.procs)
        self.network = PodNetwork(self.dir, hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:8], self.pod_cidr)

    # -- public API ------------------------------------------------------------------------
    @property
    def containerd_address(self) -> str:
        """Pass to ``ctr --address`` (``hack/images.sh --address``) to load images into this node."""
        return self.containerd.address

    @property
    def kubelet_kubeconfig(self) -> Path:
        return self.dir / "kubelet.kubeconfig"

    @property
    def node_ip(self) -> str:
        if not self._node_ip:
            self._node_ip = host_ip_towards(urllib.parse.urlsplit(self.apiserver_url).hostname or "127.0.0.1")
        return self._node_ip

    def start(self) -> None:
        """Launch containerd, kubelet and kube-proxy (detached; pids in <node>/run). Idempotent-ish:
        leftovers of an earlier run under the same state dir are stopped first."""
        t0 = time.monotonic()
        self.stop()
        ensure_packages(APT_PACKAGES)
        for b in ("kubelet", "kube-proxy"):
            if not (self.bin_dir / b).is_file():
                raise FileNotFoundError(f"{self.bin_dir / b} missing: run hack/build-binaries.sh kubernetes")
        prepare_host()
        for d in (self.log_dir, self.pki, self.kubelet_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._save_meta()
        snapshotter = "overlayfs" if overlay_supported(self.dir) else "native"
        self._save_meta(snapshotter=snapshotter)
        self.network.check_routes()
        self.network.write_config()
        self.containerd.write_config(snapshotter, self.pause_image, self.network.conf_dir)
        self.network.ensure_masquerade()
        self._make_cgroup_root()
        self._write_certs()
        pause = build_pause_image(self.pause_image, self.bin_dir, self.versions["KUBERNETES_VERSION"])

        self.containerd.start(self._env(), timeout=60)
        for image in [pause, *self.images]:
            self.import_image(image, snapshotter=snapshotter)

        self._write_kubelet_config()
        labels = ",".join(f"{k}={v}" for k, v in self.node_labels.items())
        self._spawn(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                f"--config={self.dir / 'kubelet.yaml'}",
                f"--kubeconfig={self.kubelet_kubeconfig}",
                f"--hostname-override={self.node_name}",
                f"--node-ip={self.node_ip}",
                f"--root-dir={self.kubelet_dir}",
                f"--cert-dir={self.pki}",
                *([f"--node-labels={labels}"] if labels else []),
                f"--v={self.verbosity}",
            ],
        )
        self._write_kube_proxy_config()
        self._spawn(
            "kube-proxy",
            [str(self.bin_dir / "kube-proxy"), f"--config={self.dir / 'kube-proxy.yaml'}", f"--v={self.verbosity}"],
        )
        log(
            f"node {self.node_name} launched in {time.monotonic() - t0:.1f}s (ip {self.node_ip}, "
            f"containerd {self.containerd_address}, snapshotter {snapshotter})"
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Block until the Node is Ready and kube-proxy is healthy; raises with log tails otherwise."""
        deadline = time.monotonic() + timeout
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        ctx.load_cert_chain(str(self.pki / "kubelet-client.crt"), str(self.pki / "kubelet-client.key"))
        last = "not registered"
        while time.monotonic() < deadline:
            for name in COMPONENTS:
                if not self.procs.alive(name):
                    raise RuntimeError(f"{name} exited during start-up:\n{self.procs.tail(name)}")
            try:
                with urllib.request.urlopen(
                    f"{self.apiserver_url}/api/v1/nodes/{self.node_name}", context=ctx, timeout=5
                ) as r:
                    node = json.load(r)
                ready = next((c for c in node.get("status", {}).get("conditions", []) if c["type"] == "Ready"), None)
                last = f"Ready={ready and ready['status']}: {ready and ready.get('message')}"
                if ready and ready["status"] == "True" and self._proxy_healthy():
                    log(f"node {self.node_name} Ready")
                    return
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(1)
        raise TimeoutError(
            f"node {self.node_name} not ready after {timeout}s ({last})\n"
            f"--- kubelet ---\n{self.procs.tail('kubelet')}\n"
            f"--- kube-proxy ---\n{self.procs.tail('kube-proxy')}"
        )

    def import_image(self, archive: str | Path, *, snapshotter: str | None = None, force: bool = False) -> list[str]:
        """Load an image archive into this node's containerd (see `ImageStore.import_image`)."""
        return self.containerd.images.import_image(archive, snapshotter=snapshotter, force=force)

    def stop(self) -> None:
        """Stop everything this node started and undo its host changes. Idempotent; safe after a
        crash (finds leftovers by pid file, socket address, cgroup, mount prefix and CNI names)."""
        if not self.dir.exists():
            return
        self.procs.stop("kube-proxy")
        proxy = self.bin_dir / "kube-proxy"
        # --cleanup drops every KUBE-* rule on the host: only when no other kube-proxy runs here
        if proxy.is_file() and shutil.which("iptables") and self._meta() and not running("kube-proxy"):
            subprocess.run([str(proxy), "--cleanup"], capture_output=True)
        self.procs.stop("kubelet")
        if not self.containerd.alive() and self.containerd.has_containers():
            # crashed run: containers (and their shims) outlive containerd; bring it back to end them
            try:
                self.containerd.start(self._env(), timeout=30)
            except (OSError, RuntimeError, TimeoutError) as e:
                log(f"warning: containerd for clean-up: {e}")
        if self.containerd.alive():
            self.containerd.remove_pods()
        self.containerd.stop()
        self.containerd.kill_shims()
        self._kill_cgroup_leftovers()
        unmount_all([str(self.dir), str(self.containerd.socket.parent)])
        self._remove_cgroup_root()
        self.network.remove(self.containerd.state / "netns")
        self.containerd.forget_pods()
        shutil.rmtree(self.network.ipam_dir, ignore_errors=True)
        self.containerd.remove_socket_dir()

    def status(self) -> dict[str, bool]:
        return {n: self.procs.alive(n) for n in COMPONENTS}

    # -- processes ---------------------------------------------------------------------------
    @staticmethod
    def _env() -> dict[str, str]:
        # iptables, runc, the containerd shim and modprobe live in sbin dirs a user PATH may lack
        path = os.environ.get("PATH", "").split(":")
        path += [
            d for d in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin") if d not in path
        ]
        return dict(os.environ, PATH=":".join(p for p in path if p))

    def _spawn(self, name: str, cmd: list[str]) -> int:
        return self.procs.start(name, cmd, env=self._env(), cwd=self.dir).pid

    def _kill_cgroup_leftovers(self) -> None:
        """SIGKILL every process still in our cgroup subtree."""
        me = os.getpid()
        for _ in range(3):
            pids = set()
            for d in self._cgroup_dirs():
                for procs in d.rglob("cgroup.procs"):
                    try:
                        pids.update(int(x) for x in procs.read_text().split())
                    except OSError:
                        pass
            pids.discard(me)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    # -- cgroups (v1 hierarchies; kubelet wants its --cgroup-root to exist in each) -----------
    def _cgroup_dirs(self) -> list[Path]:
        if not (CGROUP_V1 / "cpu").is_dir():  # pure cgroup v2 host
            return [CGROUP_V1 / self.cgroup_root.strip("/")] if (CGROUP_V1 / "cgroup.controllers").exists() else []
        return [
            h / self.cgroup_root.strip("/")
            for h in sorted(CGROUP_V1.iterdir())
            if h.is_dir() and not h.is_symlink() and (h / "cgroup.procs").exists()
        ]

    def _make_cgroup_root(self) -> None:
        for d in self._cgroup_dirs():
            d.mkdir(exist_ok=True)
            if d.parent.name == "cpuset":  # a fresh cpuset cgroup has no cpus/mems: inherit
                for f in ("cpuset.cpus", "cpuset.mems"):
                    if not (d / f).read_text().strip():
                        (d / f).write_text((d.parent / f).read_text())

    def _remove_cgroup_root(self) -> None:
        for d in self._cgroup_dirs():
            if not d.is_dir():
                continue
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    sub.rmdir()
                except OSError:
                    pass
            try:
                d.rmdir()
            except OSError as e:
                log(f"warning: cgroup {d} not removed: {e}")

    # -- config files ----------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / "node.json").read_text())
        except (OSError, ValueError):
            return {}

    def _save_meta(self, **extra: Any) -> None:
        """<node>/node.json: what `down`/`import`/hack/images.sh need without the other arguments."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {
            **self._meta(),
            "node_name": self.node_name,
            "apiserver_url": self.apiserver_url,
            "pod_cidr": self.pod_cidr,
            "ca_cert": str(self.ca_cert),
            "ca_key": str(self.ca_key),
            "bin_dir": str(self.bin_dir),
            "containerd_address": self.containerd_address,
            **extra,
        }
        (self.dir / "node.json").write_text(json.dumps(meta, indent=2) + "\n")

    def _write_certs(self) -> None:
        ca, key = self.ca_cert, self.ca_key
        user = f"system:node:{self.node_name}"
        crt, k = issue_cert(self.pki, "kubelet-client", ca, key, cn=user, orgs=("system:nodes",))
        write_kubeconfig(self.kubelet_kubeconfig, self.apiserver_url, ca, crt, k, user)
        issue_cert(
            self.pki,
            "kubelet-serving",
            ca,
            key,
            cn=self.node_name,
            client=False,
            server=True,
            sans=(self.node_name, "localhost", self.node_ip, "127.0.0.1"),
        )
        crt, k = issue_cert(self.pki, "kube-proxy", ca, key, cn="system:kube-proxy")
        write_kubeconfig(self.dir / "kube-proxy.kubeconfig", self.apiserver_url, ca, crt, k, "system:kube-proxy")

    def _write_kubelet_config(self) -> None:
        resolv = "/etc/resolv.conf"
        try:  # a loopback resolver (systemd-resolved stub) is useless inside pods
            if any(
                line.split()[1].startswith("127.")
                for line in Path(resolv).read_text().splitlines()
                if line.startswith("nameserver")
            ):
                resolv = "/run/systemd/resolve/resolv.conf" if Path("/run/systemd/resolve/resolv.conf").exists() else ""
        except (OSError, IndexError):
            pass
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "0.0.0.0",
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.kubelet_healthz_port,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(self.pki / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(self.pki / "kubelet-serving.key"),
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_address}",
            "imageServiceEndpoint": f"unix://{self.containerd_address}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "cgroupsPerQOS": True,
            "enforceNodeAllocatable": ["pods"],
            "failSwapOn": False,
            "failCgroupV1": False,
            # images are imported locally and can't be re-pulled: never garbage-collect them
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
                "imagefs.inodesFree": "1%",
            },
            "evictionPressureTransitionPeriod": "10s",
            "podLogsDir": str(self.dir / "pod-logs"),
            "resolvConf": resolv,
            "clusterDomain": "cluster.local",
            "maxPods": 110,
            "serializeImagePulls": False,
            "registerNode": True,
            "nodeStatusReportFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "shutdownGracePeriod": "0s",
            "protectKernelDefaults": False,
            "oomScoreAdj": -999 if have_capability(CAP_SYS_RESOURCE) else 0,
            "localStorageCapacityIsolation": True,
        }
        (self.dir / "kubelet.yaml").write_text(json.dumps(cfg, indent=2) + "\n")

    def _write_kube_proxy_config(self) -> None:
        cfg = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.dir / "kube-proxy.kubeconfig")},
            "mode": "iptables",
            "hostnameOverride": self.node_name,
            "clusterCIDR": self.pod_cidr,
            "bindAddress": self.node_ip,  # gives kube-proxy its node IP without waiting for the Node
            "healthzBindAddress": f"127.0.0.1:{self.proxy_healthz_port}",
            "metricsBindAddress": f"127.0.0.1:{self.proxy_metrics_port}",
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "oomScoreAdj": -999 if have_capability(CAP_SYS_RESOURCE) else 0,
            "iptables": {"localhostNodePorts": False, "syncPeriod": "10s", "minSyncPeriod": "1s"},
        }
        (self.dir / "kube-proxy.yaml").write_text(json.dumps(cfg, indent=2) + "\n")

    def _proxy_healthy(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.proxy_healthz_port}/healthz")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _node_from_args(a: argparse.Namespace) -> LocalNode:
    state = Path(a.state_dir)
    meta = {}
    try:
        meta = json.loads((state / "node" / "node.json").read_text())
    except (OSError, ValueError):
        pass
    apiserver = a.apiserver or meta.get("apiserver_url")
    if not apiserver:
        sys.exit("--apiserver is required on first use")
    return LocalNode(
        state,
        a.ca_cert or meta.get("ca_cert") or state / "pki" / "ca.crt",
        a.ca_key or meta.get("ca_key") or state / "pki" / "ca.key",
        apiserver,
        node_name=a.node_name or meta.get("node_name", "kubetune-node"),
        pod_cidr=a.pod_cidr or meta.get("pod_cidr", POD_CIDR),
        bin_dir=a.bin_dir or meta.get("bin_dir"),
        images=getattr(a, "image", None) or (),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("up", "down", "status"):
        s = sub.add_parser(name)
        s.add_argument("--state-dir", required=True)
        s.add_argument("--apiserver", help="https://<host-ip>:<port> (remembered in <state>/node/node.json)")
        s.add_argument("--ca-cert", help="default <state>/pki/ca.crt")
        s.add_argument("--ca-key", help="default <state>/pki/ca.key")
        s.add_argument("--node-name")
        s.add_argument("--pod-cidr")
        s.add_argument("--bin-dir")
        if name == "up":
            s.add_argument("--image", action="append", help="image archive to import (repeatable)")
            s.add_argument("--wait", type=float, default=180, help="seconds to wait for Ready (0: don't)")
    a = p.parse_args(argv)
    if a.cmd == "down":
        if not (Path(a.state_dir) / "node" / "node.json").exists() and not a.apiserver:
            a.apiserver = "https://127.0.0.1:6443"  # nothing recorded: stop() only sweeps
    node = _node_from_args(a)
    if a.cmd == "up":
        node.start()
        if a.wait:
            node.wait_ready(a.wait)
        print(
            json.dumps(
                {
                    "node": node.node_name,
                    "containerd_address": node.containerd_address,
                    "kubelet_kubeconfig": str(node.kubelet_kubeconfig),
                    "node_ip": node.node_ip,
                }
            )
        )
    elif a.cmd == "down":
        node.stop()
    elif a.cmd == "status":
        st = node.status()
        print(json.dumps(st))
        return 0 if all(st.values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
