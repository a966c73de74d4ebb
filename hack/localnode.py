#!/usr/bin/env python3
"""A real local Kubernetes node: containerd + CNI bridge + kubelet + kube-proxy, as child processes.

The node half of kubetune's local cluster (``hack/localcluster.py`` runs the control plane).
Stdlib only; certificates are made with the ``openssl`` CLI; host packages come from Debian apt.
Everything the node writes lives under ``<state_dir>/node/`` (logs in ``<state_dir>/logs/``), so it
never collides with a system containerd or kubelet::

    node = LocalNode(state_dir, ca_cert, ca_key, "https://192.0.2.2:6443")
    node.start()                      # returns once the processes are launched
    node.wait_ready(timeout=180)      # Node Ready, kube-proxy healthy
    node.import_image("x.tar")        # docker-archive or OCI archive, into the CRI namespace
    node.stop()                       # idempotent; also cleans up after a crashed run

CLI: ``python hack/localnode.py up|down|status|import|build-test-image --state-dir DIR ...``.

Images without a registry: the pause (sandbox) image and a tiny busybox test image are written
here as docker-archive tarballs by hand (static binaries, one layer) and imported with
``ctr -n k8s.io images import`` at every start. Pods must use ``imagePullPolicy: Never`` or
``IfNotPresent`` with a non-latest tag. Bigger images come from ``hack/images.sh`` (buildah).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HACK = Path(__file__).resolve().parent
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))
from localcluster import cache_dir, versions  # noqa: E402  (one reader of versions.env, one cache)

CACHE = cache_dir()
CNI_BIN_DIR = "/usr/lib/cni"
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
    "gcc": "/usr/bin/gcc",  # compiles pause.c
    "libc6-dev": "/usr/lib/x86_64-linux-gnu/libc.a",  # static glibc for pause
}
TEST_IMAGE_PACKAGES = {"busybox-static": "/bin/busybox"}


def log(msg: str) -> None:
    print(f"[localnode] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, check: bool = True, capture: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, text=True, capture_output=capture, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}): {(res.stderr or '').strip()[-2000:]}")
    return res


def ensure_packages(packages: dict[str, str]) -> None:
    """apt-get install the packages whose marker file is missing (idempotent, no-op when present)."""
    missing = [p for p, f in packages.items() if not Path(f).exists()]
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


# --------------------------------------------------------------------------------------------
# Images without a registry: hand-written docker-archive tarballs
# --------------------------------------------------------------------------------------------
def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.linkname = kind, mode, size, link
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
    return ti


def write_docker_archive(out: Path, tag: str, entries: list[tuple], config: dict) -> Path:
    """Write a one-layer image as a `docker save`-style archive that `ctr images import` loads.

    entries: (path_in_image, "dir"|"file"|"symlink", payload, mode) where payload is the host
    file path (file), the link target (symlink) or None (dir); parents must come first.
    config: the OCI/docker "config" object (Entrypoint, Cmd, Env, User, WorkingDir, ...).
    Deterministic: mtimes and owners are zeroed, so the same inputs give the same digests.
    """
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
        for path, kind, payload, mode in entries:
            name = path.lstrip("/")
            if kind == "dir":
                t.addfile(_tarinfo(name, tarfile.DIRTYPE, mode))
            elif kind == "symlink":
                t.addfile(_tarinfo(name, tarfile.SYMTYPE, mode, link=payload))
            else:
                data = Path(payload).read_bytes() if not isinstance(payload, bytes) else payload
                t.addfile(_tarinfo(name, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
    layer_bytes = layer.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    cfg = {
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "kubetune hack/localnode.py"}],
    }
    cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
    cfg_name = hashlib.sha256(cfg_bytes).hexdigest() + ".json"
    manifest = [{"Config": cfg_name, "RepoTags": [tag], "Layers": [f"{diff_id}/layer.tar"]}]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
        for name, data in ((f"{diff_id}/layer.tar", layer_bytes), (cfg_name, cfg_bytes),
                           ("manifest.json", json.dumps(manifest).encode())):
            t.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    tmp.replace(out)
    return out


def pause_source(bin_dir: Path, k8s_version: str) -> Path:
    for p in (bin_dir / "pause.c",
              CACHE / "go-mod" / "k8s.io" / f"kubernetes@{k8s_version}" / "build/pause/linux/pause.c"):
        if p.is_file():
            return p
    raise FileNotFoundError(f"pause.c not found in {bin_dir} nor in the Go module cache (run hack/build-binaries.sh kubernetes)")


def build_pause_image(tag: str, bin_dir: Path, k8s_version: str, cache: Path = CACHE / "images") -> Path:
    """Compile pause.c statically and wrap it as `tag`; cached by source hash + tag."""
    src = pause_source(bin_dir, k8s_version)
    key = hashlib.sha256(src.read_bytes() + tag.encode()).hexdigest()[:12]
    out = cache / f"pause-{key}.tar"
    if out.exists():
        return out
    ensure_packages({"gcc": APT_PACKAGES["gcc"], "libc6-dev": APT_PACKAGES["libc6-dev"]})
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / f"pause-{key}.bin"
    version = tag.rsplit(":", 1)[-1]
    run(["gcc", "-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{version}-kubetune", "-o", str(binary), str(src)])
    run(["strip", str(binary)], check=False)
    write_docker_archive(out, tag, [("/pause", "file", str(binary), 0o755)],
                         {"Entrypoint": ["/pause"], "User": "65535:65535", "WorkingDir": "/"})
    binary.unlink()
    return out


def build_busybox_image(tag: str, cache: Path = CACHE / "images") -> Path:
    """A tiny test image from Debian's busybox-static: /bin/busybox plus one symlink per applet."""
    ensure_packages(TEST_IMAGE_PACKAGES)
    bb = Path("/bin/busybox")
    key = hashlib.sha256(bb.read_bytes() + tag.encode()).hexdigest()[:12]
    out = cache / f"busybox-{key}.tar"
    if out.exists():
        return out
    applets = sorted(set(run([str(bb), "--list"]).stdout.split()) - {"busybox"})
    entries: list[tuple] = [(d, "dir", None, 0o755) for d in ("/bin", "/etc", "/root", "/var")]
    entries += [("/tmp", "dir", None, 0o1777), ("/bin/busybox", "file", str(bb), 0o755)]
    entries += [(f"/bin/{a}", "symlink", "busybox", 0o777) for a in applets]
    entries += [("/etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644),
                ("/etc/group", "file", b"root:x:0:\nnogroup:x:65534:\n", 0o644)]
    write_docker_archive(out, tag, entries, {
        "Cmd": ["/bin/sh"], "WorkingDir": "/",
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]})
    return out


# --------------------------------------------------------------------------------------------
# Certificates (openssl CLI) and kubeconfigs
# --------------------------------------------------------------------------------------------
def issue_cert(out_dir: Path, name: str, ca_cert: Path, ca_key: Path, *, cn: str, orgs: tuple[str, ...] = (),
               client: bool = True, server: bool = False, sans: tuple[str, ...] = (), days: int = 365) -> tuple[Path, Path]:
    """An ECDSA P-256 key + certificate signed by the cluster CA; returns (cert, key)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key, crt, csr, ext = (out_dir / f"{name}{s}" for s in (".key", ".crt", ".csr", ".ext"))
    run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)])
    os.chmod(key, 0o600)
    subj = "".join(f"/O={o}" for o in orgs) + f"/CN={cn}"
    run(["openssl", "req", "-new", "-key", str(key), "-subj", subj, "-out", str(csr)])
    usages = (["clientAuth"] if client else []) + (["serverAuth"] if server else [])
    lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={','.join(usages)}"]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    ext.write_text("\n".join(lines) + "\n")
    run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
         "-set_serial", "0x" + os.urandom(16).hex(), "-days", str(days), "-sha256",
         "-extfile", str(ext), "-out", str(crt)])
    csr.unlink()
    ext.unlink()
    return crt, key


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    # JSON is YAML: no PyYAML needed.
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    os.chmod(path, 0o600)
    return path


# --------------------------------------------------------------------------------------------
# Host plumbing
# --------------------------------------------------------------------------------------------
def _write_sysctl(key: str, value: str) -> None:
    p = Path("/proc/sys") / key.replace(".", "/")
    try:
        if p.read_text().strip() != value:
            p.write_text(value)
    except OSError as e:
        log(f"warning: sysctl {key}={value}: {e}")


def prepare_host() -> None:
    """Kernel modules + sysctls a bridged pod network needs (modules may be built in: best effort)."""
    if shutil.which("modprobe"):
        for m in ("overlay", "br_netfilter"):
            subprocess.run(["modprobe", m], capture_output=True)
    for k, v in (("net.ipv4.ip_forward", "1"), ("net.bridge.bridge-nf-call-iptables", "1"),
                 ("net.bridge.bridge-nf-call-ip6tables", "1")):
        _write_sysctl(k, v)


def overlay_supported(root: Path) -> bool:
    """Can we mount overlayfs with upper/work dirs on `root`'s filesystem?"""
    if "overlay" not in Path("/proc/filesystems").read_text():
        return False
    t = root / ".overlay-probe"
    shutil.rmtree(t, ignore_errors=True)
    for d in ("lower", "upper", "work", "merged"):
        (t / d).mkdir(parents=True)
    try:
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work", str(t / "merged")],
                           capture_output=True)
        if r.returncode == 0:
            subprocess.run(["umount", str(t / "merged")], capture_output=True)
        return r.returncode == 0
    finally:
        shutil.rmtree(t, ignore_errors=True)


def have_capability(bit: int) -> bool:
    """Is capability `bit` (see capability.h) in our effective set?"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


CAP_SYS_RESOURCE = 24


def host_ip_towards(host: str) -> str:
    """The local source IP used to reach `host` (the apiserver); the node registers with it."""
    try:
        ip = socket.gethostbyname(host)
        res = run(["ip", "-j", "route", "get", ip])
        route = json.loads(res.stdout)[0]
        src = route.get("prefsrc") or (ip if route.get("type") == "local" else None)
        if src and not ipaddress.ip_address(src).is_loopback:
            return src
    except Exception:  # noqa: BLE001 - fall through to the default route
        pass
    route = json.loads(run(["ip", "-j", "route", "get", "1.1.1.1"]).stdout)[0]
    return route["prefsrc"]


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM, wait, SIGKILL; reaps our own children."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not _alive(pid):
                return
            time.sleep(0.1)


def _running(exe_name: str) -> list[int]:
    """Pids whose argv[0] ends with /exe_name (another node's kubelet, say)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            argv0 = _proc_cmdline(int(p.name)).split(" ", 1)[0]
            if argv0 == exe_name or argv0.endswith("/" + exe_name):
                out.append(int(p.name))
    return out


def _mountpoints_under(prefixes: list[str]) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        if any(mp == p or mp.startswith(p.rstrip("/") + "/") for p in prefixes):
            out.append(mp)
    return sorted(set(out), key=lambda m: m.count("/"), reverse=True)


# --------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------
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

    def __init__(self, state_dir, ca_cert, ca_key, apiserver_url: str, node_name: str = "kubetune-node",
                 pod_cidr: str = "10.88.0.0/16", *, bin_dir=None, node_ip: str | None = None,
                 images=(), kubelet_port: int = 10250, kubelet_healthz_port: int = 10248,
                 proxy_healthz_port: int = 10256, proxy_metrics_port: int = 10249,
                 node_labels: dict[str, str] | None = None, verbosity: int = 2):
        self.versions = versions()
        self.state_dir = Path(state_dir).resolve()
        self.ca_cert, self.ca_key = Path(ca_cert).resolve(), Path(ca_key).resolve()
        self.apiserver_url = apiserver_url.rstrip("/")
        self.node_name = node_name
        self.pod_cidr = str(ipaddress.ip_network(pod_cidr))
        self.bin_dir = Path(bin_dir) if bin_dir else CACHE / "bin" / f"kubernetes-{self.versions['KUBERNETES_VERSION']}"
        self._node_ip = node_ip
        self.images = [Path(p) for p in images]
        self.kubelet_port, self.kubelet_healthz_port = kubelet_port, kubelet_healthz_port
        self.proxy_healthz_port, self.proxy_metrics_port = proxy_healthz_port, proxy_metrics_port
        self.node_labels = node_labels or {}
        self.verbosity = verbosity
        self.pause_image = self.versions.get("PAUSE_IMAGE", "localhost/kubetune-pause:3.10.1")

        self.dir = self.state_dir / "node"
        self.log_dir = self.state_dir / "logs"
        self.pki = self.dir / "pki"
        self.run_dir = self.dir / "run"
        self.containerd_root = self.dir / "containerd" / "root"
        self.containerd_state = self.dir / "containerd" / "state"
        self.cni_conf_dir = self.dir / "cni" / "net.d"
        self.cni_ipam_dir = self.dir / "cni" / "ipam"
        self.kubelet_dir = self.dir / "kubelet"
        ident = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:8]
        self.bridge = f"kt{ident}"  # <= 15 chars (IFNAMSIZ)
        self.cni_network = f"kubetune-{ident}"
        self.cgroup_root = "/" + node_name
        # unix socket paths are limited to 107 bytes: fall back to /run for deep state dirs
        sock = self.dir / "containerd" / "containerd.sock"
        self.containerd_socket = sock if len(str(sock)) < 100 else Path(f"/run/kubetune-{ident}/containerd.sock")
        self.masq_comment = f"kubetune-node {ident} pod masquerade"
        self._procs: dict[str, subprocess.Popen] = {}

    # -- public API ------------------------------------------------------------------------
    @property
    def containerd_address(self) -> str:
        """Pass to ``ctr --address`` (``hack/images.sh --address``) to load images into this node."""
        return str(self.containerd_socket)

    @property
    def kubelet_kubeconfig(self) -> Path:
        return self.dir / "kubelet.kubeconfig"

    @property
    def node_ip(self) -> str:
        if not self._node_ip:
            self._node_ip = host_ip_towards(urllib.parse.urlsplit(self.apiserver_url).hostname)
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
        for d in (self.log_dir, self.pki, self.run_dir, self.containerd_root, self.containerd_state,
                  self.cni_conf_dir, self.cni_ipam_dir, self.kubelet_dir, self.containerd_socket.parent):
            d.mkdir(parents=True, exist_ok=True)
        self._save_meta()
        snapshotter = "overlayfs" if overlay_supported(self.dir) else "native"
        self._write_containerd_config(snapshotter)
        self._write_cni_config()
        self._ensure_masquerade()
        self._make_cgroup_root()
        self._write_certs()
        pause = build_pause_image(self.pause_image, self.bin_dir, self.versions["KUBERNETES_VERSION"])

        self._spawn("containerd", ["containerd", "--config", str(self.dir / "containerd.toml")])
        self._wait_containerd(60)
        for image in [pause, *self.images]:
            self.import_image(image, snapshotter=snapshotter)

        self._write_kubelet_config()
        labels = ",".join(f"{k}={v}" for k, v in self.node_labels.items())
        self._spawn("kubelet", [str(self.bin_dir / "kubelet"),
                                f"--config={self.dir / 'kubelet.yaml'}",
                                f"--kubeconfig={self.kubelet_kubeconfig}",
                                f"--hostname-override={self.node_name}",
                                f"--node-ip={self.node_ip}",
                                f"--root-dir={self.kubelet_dir}",
                                f"--cert-dir={self.pki}",
                                *([f"--node-labels={labels}"] if labels else []),
                                f"--v={self.verbosity}"])
        self._write_kube_proxy_config()
        self._spawn("kube-proxy", [str(self.bin_dir / "kube-proxy"), f"--config={self.dir / 'kube-proxy.yaml'}",
                                   f"--v={self.verbosity}"])
        log(f"node {self.node_name} launched in {time.monotonic() - t0:.1f}s (ip {self.node_ip}, "
            f"containerd {self.containerd_address}, snapshotter {snapshotter})")

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Block until the Node is Ready and kube-proxy is healthy; raises with log tails otherwise."""
        deadline = time.monotonic() + timeout
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        ctx.load_cert_chain(str(self.pki / "kubelet-client.crt"), str(self.pki / "kubelet-client.key"))
        last = "not registered"
        while time.monotonic() < deadline:
            for name in ("containerd", "kubelet", "kube-proxy"):
                if not self._pid_alive(name):
                    raise RuntimeError(f"{name} exited during start-up:\n{self._tail(name)}")
            try:
                with urllib.request.urlopen(f"{self.apiserver_url}/api/v1/nodes/{self.node_name}",
                                            context=ctx, timeout=5) as r:
                    node = json.load(r)
                ready = next((c for c in node.get("status", {}).get("conditions", []) if c["type"] == "Ready"), None)
                last = f"Ready={ready and ready['status']}: {ready and ready.get('message')}"
                if ready and ready["status"] == "True" and self._proxy_healthy():
                    log(f"node {self.node_name} Ready")
                    return
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(1)
        raise TimeoutError(f"node {self.node_name} not ready after {timeout}s ({last})\n"
                           f"--- kubelet ---\n{self._tail('kubelet')}\n--- kube-proxy ---\n{self._tail('kube-proxy')}")

    def import_image(self, archive, *, snapshotter: str | None = None, force: bool = False) -> list[str]:
        """Load a docker-archive / OCI archive into containerd's CRI namespace (k8s.io); returns
        the image refs. Skipped when this containerd already imported the same file (size+mtime)
        and still has its refs: re-importing a 6 GB trainer archive costs over a minute."""
        archive = Path(archive).resolve()
        st = archive.stat()
        key = f"{st.st_size}:{st.st_mtime_ns}"
        stamps_file = self.dir / "imported.json"
        try:
            stamps = json.loads(stamps_file.read_text())
        except (OSError, ValueError):
            stamps = {}
        prev = stamps.get(str(archive))
        if not force and prev and prev["key"] == key:
            have = set(self._ctr("images", "ls", "-q").stdout.split())
            if prev["refs"] and set(prev["refs"]) <= have:
                return prev["refs"]
        t0 = time.monotonic()
        snap = snapshotter or self._meta().get("snapshotter", "overlayfs")
        res = run(["ctr", "--address", self.containerd_address, "-n", "k8s.io", "images", "import",
                   "--snapshotter", snap, str(archive)])
        refs = [l.split()[1] for l in res.stdout.splitlines() if l.startswith("unpacking ")]
        stamps[str(archive)] = {"key": key, "refs": refs}
        stamps_file.write_text(json.dumps(stamps, indent=2) + "\n")
        log(f"imported {archive.name} ({', '.join(refs)}) in {time.monotonic() - t0:.1f}s")
        return refs

    def stop(self) -> None:
        """Stop everything this node started and undo its host changes. Idempotent; safe after a
        crash (finds leftovers by pid file, socket address, cgroup, mount prefix and CNI names)."""
        if not self.dir.exists():
            return
        self._stop_pid("kube-proxy")
        proxy = self.bin_dir / "kube-proxy"
        # --cleanup drops every KUBE-* rule on the host: only when no other kube-proxy runs here
        if proxy.is_file() and shutil.which("iptables") and self._meta() and not _running("kube-proxy"):
            subprocess.run([str(proxy), "--cleanup"], capture_output=True)
        self._stop_pid("kubelet")
        if not self._pid_alive("containerd") and self._has_containers():
            # crashed run: containers (and their shims) outlive containerd; bring it back to end them
            try:
                self._spawn("containerd", ["containerd", "--config", str(self.dir / "containerd.toml")])
                self._wait_containerd(30)
            except (OSError, RuntimeError, TimeoutError) as e:
                log(f"warning: containerd for clean-up: {e}")
        if self._pid_alive("containerd"):
            self._remove_pods()
        self._stop_pid("containerd")
        self._kill_leftovers()
        for mp in _mountpoints_under([str(self.dir), str(self.containerd_socket.parent)]):
            if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True)
        self._remove_cgroup_root()
        self._remove_network()
        self._forget_pods()
        shutil.rmtree(self.cni_ipam_dir, ignore_errors=True)
        if self.containerd_socket.parent != self.dir / "containerd":
            shutil.rmtree(self.containerd_socket.parent, ignore_errors=True)

    def status(self) -> dict[str, bool]:
        return {n: self._pid_alive(n) for n in ("containerd", "kubelet", "kube-proxy")}

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> int:
        logf = open(self.log_dir / f"{name}.log", "ab")
        logf.write(f"\n==== {time.strftime('%F %T')} {shlex.join(cmd)}\n".encode())
        logf.flush()
        # iptables, runc, the containerd shim and modprobe live in sbin dirs a user PATH may lack
        path = os.environ.get("PATH", "").split(":")
        path += [d for d in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin") if d not in path]
        env = dict(os.environ, PATH=":".join(p for p in path if p))
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             start_new_session=True, env=env, cwd=self.dir)
        logf.close()
        self._procs[name] = p
        (self.run_dir / f"{name}.pid").write_text(f"{p.pid}\n")
        return p.pid

    def _pid(self, name: str) -> int | None:
        p = self._procs.get(name)
        if p is not None:  # started by this process: no pid-file guessing (cmdline is empty mid-exec)
            return p.pid if p.poll() is None else None
        try:
            pid = int((self.run_dir / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None
        # guard against pid reuse: the process must reference this node's files
        return pid if _alive(pid) and str(self.dir) in _proc_cmdline(pid) else None

    def _pid_alive(self, name: str) -> bool:
        return self._pid(name) is not None

    def _stop_pid(self, name: str) -> None:
        pid = self._pid(name)
        if pid:
            _kill(pid)
        if name in self._procs:
            self._procs.pop(name).poll()
        (self.run_dir / f"{name}.pid").unlink(missing_ok=True)

    def _tail(self, name: str, n: int = 40) -> str:
        try:
            return "\n".join((self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _ctr(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return run(["ctr", "--address", self.containerd_address, "-n", "k8s.io", *args], check=check)

    def _wait_containerd(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._pid_alive("containerd"):
                raise RuntimeError(f"containerd exited:\n{self._tail('containerd')}")
            if self.containerd_socket.exists() and self._ctr("version").returncode == 0:
                plugins = self._ctr("plugins", "ls").stdout
                if not any("cri" in l and " ok" in l for l in plugins.splitlines()):
                    raise RuntimeError(f"containerd CRI plugin not ok:\n{plugins}\n{self._tail('containerd')}")
                return
            time.sleep(0.2)
        raise TimeoutError(f"containerd not up after {timeout}s:\n{self._tail('containerd')}")

    def _remove_pods(self) -> None:
        """Tear pods down while containerd still runs: crictl (CNI DEL included) when available,
        else kill tasks and delete containers with ctr (the network sweep then cleans up)."""
        crictl = shutil.which("crictl") or next(iter(sorted((CACHE / "bin").glob("crictl-*/crictl"))), None)
        if crictl:
            subprocess.run([str(crictl), "--runtime-endpoint", f"unix://{self.containerd_address}", "--timeout", "30s",
                            "rmp", "--all", "--force"], capture_output=True)
        for t in self._ctr("tasks", "ls", "-q").stdout.split():
            self._ctr("tasks", "kill", "--all", "--signal", "SIGKILL", t)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # CRI deletes exited tasks itself; delete what it leaves
            rows = [l.split() for l in self._ctr("tasks", "ls").stdout.splitlines()[1:] if l.strip()]
            if not rows:
                break
            for row in rows:
                if row[-1] == "STOPPED":
                    self._ctr("tasks", "delete", row[0])
            time.sleep(0.2)
        for c in self._ctr("containers", "ls", "-q").stdout.split():
            self._ctr("containers", "delete", c)

    def _has_containers(self) -> bool:
        meta = self.containerd_root / "io.containerd.metadata.v1.bolt" / "meta.db"
        cri = self.containerd_root / "io.containerd.grpc.v1.cri" / "sandboxes"
        return (self.dir / "containerd.toml").exists() and meta.exists() and cri.is_dir() and any(cri.iterdir())

    def _forget_pods(self) -> None:
        """Drop CRI's per-sandbox dirs and containerd's runtime state (images stay in the root),
        plus libcni's cache entries of our sandboxes; only once nothing is mounted there."""
        if _mountpoints_under([str(self.containerd_state)]):
            log(f"warning: mounts left under {self.containerd_state}; not removing it")
            return
        cri = self.containerd_root / "io.containerd.grpc.v1.cri"
        for sandbox in (cri / "sandboxes").glob("*"):
            for cached in Path("/var/lib/cni/results").glob(f"*-{sandbox.name}-*"):
                cached.unlink(missing_ok=True)
        for d in (cri / "sandboxes", cri / "containers", self.containerd_state):
            shutil.rmtree(d, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """SIGKILL shims of our containerd and every process in our cgroup subtree."""
        me = os.getpid()
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == me:
                continue
            cmd = _proc_cmdline(int(p.name))
            if "containerd-shim" in cmd and self.containerd_address in cmd:
                _kill(int(p.name), timeout=0)
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
        return [h / self.cgroup_root.strip("/") for h in sorted(CGROUP_V1.iterdir())
                if h.is_dir() and not h.is_symlink() and (h / "cgroup.procs").exists()]

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

    # -- network -------------------------------------------------------------------------------
    def _write_cni_config(self) -> None:
        for old in self.cni_conf_dir.glob("*"):
            old.unlink()
        conf = {
            "cniVersion": "1.0.0", "name": self.cni_network,
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,  # Service hairpin (a pod reaching itself via its ClusterIP)
                 "ipam": {"type": "host-local", "dataDir": str(self.cni_ipam_dir),
                          "ranges": [[{"subnet": self.pod_cidr}]], "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (self.cni_conf_dir / "10-kubetune.conflist").write_text(json.dumps(conf, indent=2) + "\n")

    def _masq_rule(self) -> list[str]:
        return ["POSTROUTING", "-s", self.pod_cidr, "!", "-d", self.pod_cidr,
                "-m", "comment", "--comment", self.masq_comment, "-j", "MASQUERADE"]

    def _ensure_masquerade(self) -> None:
        """One static rule instead of the bridge plugin's per-pod ipMasq chains (nothing to leak)."""
        if subprocess.run(["iptables", "-t", "nat", "-C", *self._masq_rule()], capture_output=True).returncode:
            run(["iptables", "-t", "nat", "-A", *self._masq_rule()])

    def _remove_network(self) -> None:
        if not shutil.which("iptables"):
            return
        while subprocess.run(["iptables", "-t", "nat", "-D", *self._masq_rule()], capture_output=True).returncode == 0:
            pass
        # portmap chains of pods whose CNI DEL never ran (crash, or no crictl): comments carry our net name
        save = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
        marker = f'name: "{self.cni_network}"'
        chains = set()
        for line in save.splitlines():
            if line.startswith("-A ") and self.cni_network in line:
                args = shlex.split(line)
                if marker not in " ".join(args):
                    continue
                subprocess.run(["iptables", "-t", "nat", "-D", *args[1:]], capture_output=True)
                if "-j" in args and args[args.index("-j") + 1].startswith("CNI-"):
                    chains.add(args[args.index("-j") + 1])
        for c in chains:
            subprocess.run(["iptables", "-t", "nat", "-F", c], capture_output=True)
            subprocess.run(["iptables", "-t", "nat", "-X", c], capture_output=True)
        netns_dir = self.containerd_state / "netns"  # netns_mounts_under_state_dir = true
        if netns_dir.is_dir():
            for ns in netns_dir.iterdir():
                subprocess.run(["umount", str(ns)], capture_output=True)
                ns.unlink(missing_ok=True)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        for cached in Path("/var/lib/cni/results").glob(f"{self.cni_network}-*"):  # libcni's result cache
            cached.unlink(missing_ok=True)
        # the kubelet's own chains (kube-proxy --cleanup leaves them): canaries + the localnet firewall
        if _running("kubelet"):
            return
        for table, chain in (("filter", "INPUT"), ("filter", "OUTPUT")):
            while subprocess.run(["iptables", "-t", table, "-D", chain, "-j", "KUBE-FIREWALL"],
                                 capture_output=True).returncode == 0:
                pass
        for table, chain in (("filter", "KUBE-FIREWALL"), ("filter", "KUBE-KUBELET-CANARY"),
                             ("nat", "KUBE-KUBELET-CANARY"), ("mangle", "KUBE-KUBELET-CANARY"),
                             ("mangle", "KUBE-IPTABLES-HINT")):
            subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True)
            subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True)

    # -- config files ----------------------------------------------------------------------------
    def _meta(self) -> dict:
        try:
            return json.loads((self.dir / "node.json").read_text())
        except (OSError, ValueError):
            return {}

    def _save_meta(self, **extra) -> None:
        meta = {**self._meta(), "node_name": self.node_name, "apiserver_url": self.apiserver_url, "pod_cidr": self.pod_cidr,
                "ca_cert": str(self.ca_cert), "ca_key": str(self.ca_key), "bin_dir": str(self.bin_dir),
                "containerd_address": self.containerd_address, **extra}
        (self.dir / "node.json").write_text(json.dumps(meta, indent=2) + "\n")

    def _write_containerd_config(self, snapshotter: str) -> None:
        self._save_meta(snapshotter=snapshotter)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        q = json.dumps  # TOML basic strings are JSON strings for our purposes
        toml = f"""\
# generated by hack/localnode.py
version = 2
root = {q(str(self.containerd_root))}
state = {q(str(self.containerd_state))}
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = {q(self.containerd_address)}

[ttrpc]
  address = {q(self.containerd_address + ".ttrpc")}

[debug]
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = {q(str(self.dir / "containerd" / "opt"))}

[{cri}]
  sandbox_image = {q(self.pause_image)}
  netns_mounts_under_state_dir = true
  # Without CAP_SYS_RESOURCE (these VMs) nobody may lower oom_score_adj; the kubelet asks for
  # -998 for every pause container and runc init dies ("can't get final child's PID from pipe").
  restrict_oom_score_adj = {str(not have_capability(CAP_SYS_RESOURCE)).lower()}
  enable_cdi = false

[{cri}.containerd]
  snapshotter = {q(snapshotter)}
  default_runtime_name = "runc"
  discard_unpacked_layers = false

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  BinaryName = "/usr/sbin/runc"
  Root = {q(str(self.containerd_state / "runc"))}

[{cri}.cni]
  bin_dir = {q(CNI_BIN_DIR)}
  conf_dir = {q(str(self.cni_conf_dir))}
  max_conf_num = 1
"""
        (self.dir / "containerd.toml").write_text(toml)

    def _write_certs(self) -> None:
        ca, key = self.ca_cert, self.ca_key
        crt, k = issue_cert(self.pki, "kubelet-client", ca, key, cn=f"system:node:{self.node_name}",
                            orgs=("system:nodes",))
        write_kubeconfig(self.kubelet_kubeconfig, self.apiserver_url, ca, crt, k, f"system:node:{self.node_name}")
        sans = (f"DNS:{self.node_name}", "DNS:localhost", f"IP:{self.node_ip}", "IP:127.0.0.1")
        issue_cert(self.pki, "kubelet-serving", ca, key, cn=self.node_name, client=False, server=True, sans=sans)
        crt, k = issue_cert(self.pki, "kube-proxy", ca, key, cn="system:kube-proxy")
        write_kubeconfig(self.dir / "kube-proxy.kubeconfig", self.apiserver_url, ca, crt, k, "system:kube-proxy")

    def _write_kubelet_config(self) -> None:
        resolv = "/etc/resolv.conf"
        try:  # a loopback resolver (systemd-resolved stub) is useless inside pods
            if any(l.split()[1].startswith("127.") for l in Path(resolv).read_text().splitlines()
                   if l.startswith("nameserver")):
                resolv = "/run/systemd/resolve/resolv.conf" if Path("/run/systemd/resolve/resolv.conf").exists() else ""
        except (OSError, IndexError):
            pass
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": "0.0.0.0", "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": self.kubelet_healthz_port,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.ca_cert)}},
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(self.pki / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(self.pki / "kubelet-serving.key"),
            "rotateCertificates": False, "serverTLSBootstrap": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_address}",
            "imageServiceEndpoint": f"unix://{self.containerd_address}",
            "cgroupDriver": "cgroupfs", "cgroupRoot": self.cgroup_root, "cgroupsPerQOS": True,
            "enforceNodeAllocatable": ["pods"],
            "failSwapOn": False, "failCgroupV1": False,
            # images are imported locally and can't be re-pulled: never garbage-collect them
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%",
                             "imagefs.available": "1%", "imagefs.inodesFree": "1%"},
            "evictionPressureTransitionPeriod": "10s",
            "podLogsDir": str(self.dir / "pod-logs"),
            "resolvConf": resolv, "clusterDomain": "cluster.local",
            "maxPods": 110,
            "serializeImagePulls": False, "registerNode": True,
            "nodeStatusReportFrequency": "10s", "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s", "fileCheckFrequency": "10s",
            "shutdownGracePeriod": "0s", "protectKernelDefaults": False,
            "oomScoreAdj": -999 if have_capability(CAP_SYS_RESOURCE) else 0,
            "localStorageCapacityIsolation": True,
        }
        (self.dir / "kubelet.yaml").write_text(json.dumps(cfg, indent=2) + "\n")

    def _write_kube_proxy_config(self) -> None:
        cfg = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.dir / "kube-proxy.kubeconfig")},
            "mode": "iptables", "hostnameOverride": self.node_name, "clusterCIDR": self.pod_cidr,
            "bindAddress": self.node_ip,  # gives kube-proxy its node IP without waiting for the Node
            "healthzBindAddress": f"127.0.0.1:{self.proxy_healthz_port}",
            "metricsBindAddress": f"127.0.0.1:{self.proxy_metrics_port}",
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "oomScoreAdj": -999 if have_capability(CAP_SYS_RESOURCE) else 0,
            "iptables": {"localhostNodePorts": False, "syncPeriod": "10s", "minSyncPeriod": "1s"},
        }
        (self.dir / "kube-proxy.yaml").write_text(json.dumps(cfg, indent=2) + "\n")

    def _proxy_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.proxy_healthz_port}/healthz", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False


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
    return LocalNode(state, a.ca_cert or meta.get("ca_cert") or state / "pki" / "ca.crt",
                     a.ca_key or meta.get("ca_key") or state / "pki" / "ca.key", apiserver,
                     node_name=a.node_name or meta.get("node_name", "kubetune-node"),
                     pod_cidr=a.pod_cidr or meta.get("pod_cidr", "10.88.0.0/16"),
                     bin_dir=a.bin_dir or meta.get("bin_dir"), images=getattr(a, "image", None) or ())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("up", "down", "status", "import"):
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
        if name == "import":
            s.add_argument("archives", nargs="+")
    s = sub.add_parser("build-test-image", help="write the busybox test image archive; prints its path")
    s.add_argument("--tag", default=None)
    s = sub.add_parser("build-pause-image", help="write the pause image archive; prints its path")
    a = p.parse_args(argv)

    pinned = versions()
    if a.cmd == "build-test-image":
        print(build_busybox_image(a.tag or pinned.get("BUSYBOX_TEST_IMAGE", "localhost/kubetune-busybox:1.35.0")))
        return 0
    if a.cmd == "build-pause-image":
        print(build_pause_image(pinned.get("PAUSE_IMAGE", "localhost/kubetune-pause:3.10.1"),
                                CACHE / "bin" / f"kubernetes-{pinned['KUBERNETES_VERSION']}", pinned["KUBERNETES_VERSION"]))
        return 0
    if a.cmd == "down":
        if not (Path(a.state_dir) / "node" / "node.json").exists() and not a.apiserver:
            a.apiserver = "https://127.0.0.1:6443"  # nothing recorded: stop() only sweeps
    node = _node_from_args(a)
    if a.cmd == "up":
        node.start()
        if a.wait:
            node.wait_ready(a.wait)
        print(json.dumps({"node": node.node_name, "containerd_address": node.containerd_address,
                          "kubelet_kubeconfig": str(node.kubelet_kubeconfig), "node_ip": node.node_ip}))
    elif a.cmd == "down":
        node.stop()
    elif a.cmd == "status":
        st = node.status()
        print(json.dumps(st))
        return 0 if all(st.values()) else 1
    elif a.cmd == "import":
        for arc in a.archives:
            node.import_image(arc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
