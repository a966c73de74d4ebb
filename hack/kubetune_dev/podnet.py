"""The local node's pod network: a CNI bridge with host-local IPAM, one static MASQUERADE rule,
and the sweep that removes every trace of it (also after a crash).

Host-global names carry an id derived from the state dir: bridge `kt<8 hex>`, CNI network
`kubetune-<8 hex>`, the nat rule's comment `kubetune-node <8 hex> pod masquerade`.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

from kubetune_dev.host import run
from kubetune_dev.procs import running


class PodNetwork:
    def __init__(self, node_dir: Path, ident: str, pod_cidr: str) -> None:
        self.pod_cidr = pod_cidr
        self.conf_dir = node_dir / "cni" / "net.d"
        self.ipam_dir = node_dir / "cni" / "ipam"
        self.bridge = f"kt{ident}"  # <= 15 chars (IFNAMSIZ)
        self.name = f"kubetune-{ident}"
        self.masq_comment = f"kubetune-node {ident} pod masquerade"

    def check_routes(self) -> None:
        """No other interface may route the pod CIDR: the host would send pod traffic there ("no route
        to host" from probes, the operator's API calls timing out). A leftover buildah/podman bridge
        (`cni-podman*`, down) is removed; anything else is an error naming it."""
        import ipaddress

        out = subprocess.run(["ip", "-j", "route", "show"], capture_output=True, text=True)
        ours = ipaddress.ip_network(self.pod_cidr)
        for route in json.loads(out.stdout or "[]"):
            dev, dst = route.get("dev", ""), route.get("dst", "")
            if dev == self.bridge or dst in ("", "default"):
                continue
            try:
                overlaps = ipaddress.ip_network(dst, strict=False).overlaps(ours)
            except ValueError:
                continue
            if not overlaps:
                continue
            if dev.startswith("cni-podman"):
                print(f"[localnode] removing {dev} ({dst}): it routes the pod CIDR {ours}", flush=True)
                run(["ip", "link", "delete", dev])
                continue
            raise RuntimeError(
                f"{dev} routes {dst}, which overlaps the node's pod CIDR {ours}: remove it or pick another pod_cidr"
            )

    def write_config(self) -> None:
        for d in (self.conf_dir, self.ipam_dir):
            d.mkdir(parents=True, exist_ok=True)
        for old in self.conf_dir.glob("*"):
            old.unlink()
        conf = {
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,  # Service hairpin (a pod reaching itself via its ClusterIP)
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.ipam_dir),
                        "ranges": [[{"subnet": self.pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (self.conf_dir / "10-kubetune.conflist").write_text(json.dumps(conf, indent=2) + "\n")

    def _masq_rule(self) -> list[str]:
        return [
            "POSTROUTING",
            "-s",
            self.pod_cidr,
            "!",
            "-d",
            self.pod_cidr,
            "-m",
            "comment",
            "--comment",
            self.masq_comment,
            "-j",
            "MASQUERADE",
        ]

    def ensure_masquerade(self) -> None:
        """One static rule instead of the bridge plugin's per-pod ipMasq chains (nothing to leak)."""
        if subprocess.run(["iptables", "-t", "nat", "-C", *self._masq_rule()], capture_output=True).returncode:
            run(["iptables", "-t", "nat", "-A", *self._masq_rule()])

    def remove(self, netns_dir: Path) -> None:
        """Delete our nat rule, leaked portmap chains, the netns files under `netns_dir`, the bridge,
        libcni's cache entries, and (when no other kubelet runs here) the kubelet's own chains."""
        if not shutil.which("iptables"):
            return
        while subprocess.run(["iptables", "-t", "nat", "-D", *self._masq_rule()], capture_output=True).returncode == 0:
            pass
        # portmap chains of pods whose CNI DEL never ran (crash, or no crictl): comments carry our net name
        save = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
        marker = f'name: "{self.name}"'
        chains = set()
        for line in save.splitlines():
            if line.startswith("-A ") and self.name in line:
                args = shlex.split(line)
                if marker not in " ".join(args):
                    continue
                subprocess.run(["iptables", "-t", "nat", "-D", *args[1:]], capture_output=True)
                if "-j" in args and args[args.index("-j") + 1].startswith("CNI-"):
                    chains.add(args[args.index("-j") + 1])
        for c in chains:
            subprocess.run(["iptables", "-t", "nat", "-F", c], capture_output=True)
            subprocess.run(["iptables", "-t", "nat", "-X", c], capture_output=True)
        if netns_dir.is_dir():  # containerd's netns_mounts_under_state_dir = true
            for ns in netns_dir.iterdir():
                subprocess.run(["umount", str(ns)], capture_output=True)
                ns.unlink(missing_ok=True)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        for cached in Path("/var/lib/cni/results").glob(f"{self.name}-*"):  # libcni's result cache
            cached.unlink(missing_ok=True)
        # the kubelet's own chains (kube-proxy --cleanup leaves them): canaries + the localnet firewall
        if running("kubelet"):
            return
        for table, chain in (("filter", "INPUT"), ("filter", "OUTPUT")):
            while (
                subprocess.run(
                    ["iptables", "-t", table, "-D", chain, "-j", "KUBE-FIREWALL"], capture_output=True
                ).returncode
                == 0
            ):
                pass
        for table, chain in (
            ("filter", "KUBE-FIREWALL"),
            ("filter", "KUBE-KUBELET-CANARY"),
            ("nat", "KUBE-KUBELET-CANARY"),
            ("mangle", "KUBE-KUBELET-CANARY"),
            ("mangle", "KUBE-IPTABLES-HINT"),
        ):
            subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True)
            subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True)
