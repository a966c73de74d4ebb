"""The host a local cluster runs on: its IP addresses, Debian packages, kernel settings, mounts
and capabilities. Stdlib only; packages come from apt."""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

CAP_SYS_RESOURCE = 24  # capability.h


def log(msg: str) -> None:
    print(f"[localnode] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, check: bool = True, capture: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, text=True, capture_output=capture, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}): {(res.stderr or '').strip()[-2000:]}")
    return res


def host_ip() -> str:
    """The address pods on a local node (and in-cluster clients) use to reach this host."""
    try:
        out = subprocess.run(["ip", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True, check=True).stdout
        return out.split(" src ")[1].split()[0]
    except (subprocess.CalledProcessError, IndexError, FileNotFoundError):
        return "127.0.0.1"


def host_ip_towards(host: str) -> str:
    """The local source IP used to reach `host` (the apiserver); a node registers with it."""
    try:
        ip = socket.gethostbyname(host)
        route = json.loads(run(["ip", "-j", "route", "get", ip]).stdout)[0]
        src = route.get("prefsrc") or (ip if route.get("type") == "local" else None)
        if src and not ipaddress.ip_address(src).is_loopback:
            return src
    except Exception:  # noqa: BLE001 - fall through to the default route
        pass
    return json.loads(run(["ip", "-j", "route", "get", "1.1.1.1"]).stdout)[0]["prefsrc"]


def ensure_packages(packages: dict[str, str]) -> None:
    """apt-get install the packages (name -> a file it installs) whose file is missing; no-op when present."""
    missing = [p for p, f in packages.items() if not Path(f).exists()]
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def write_sysctl(key: str, value: str) -> None:
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
    for k, v in (
        ("net.ipv4.ip_forward", "1"),
        ("net.bridge.bridge-nf-call-iptables", "1"),
        ("net.bridge.bridge-nf-call-ip6tables", "1"),
    ):
        write_sysctl(k, v)


def overlay_supported(root: Path) -> bool:
    """Can we mount overlayfs with upper/work dirs on `root`'s filesystem?"""
    if "overlay" not in Path("/proc/filesystems").read_text():
        return False
    t = root / ".overlay-probe"
    shutil.rmtree(t, ignore_errors=True)
    for d in ("lower", "upper", "work", "merged"):
        (t / d).mkdir(parents=True)
    try:
        r = subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work",
                str(t / "merged"),
            ],
            capture_output=True,
        )
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


def mountpoints_under(prefixes: list[str]) -> list[str]:
    """Mount points at or below any of `prefixes`, deepest first (the order to unmount them)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        if any(mp == p or mp.startswith(p.rstrip("/") + "/") for p in prefixes):
            out.append(mp)
    return sorted(set(out), key=lambda m: m.count("/"), reverse=True)


def unmount_all(prefixes: list[str]) -> None:
    for mp in mountpoints_under(prefixes):
        if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)
