"""One certificate issuer and one kubeconfig writer for the local cluster (control plane and
node alike), with the `openssl` CLI: no Python crypto dependency.

    make_ca(pki)                                         # ca.crt, ca.key (idempotent)
    issue_cert(pki, "admin", pki / "ca.crt", pki / "ca.key", cn="kubetune-admin", orgs=("system:masters",))
    issue_cert(pki, "kubelet-serving", ..., cn=node, client=False, server=True, sans=[node, "10.0.0.5"])
    write_kubeconfig(path, "https://10.0.0.5:6443", pki / "ca.crt", crt, key, user="kubetune-admin")
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path


def openssl(*args: str, cwd: Path | None = None) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"openssl {args[0]} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")


def make_ca(pki: Path, cn: str = "kubetune-local-ca", days: int = 3650) -> tuple[Path, Path]:
    """A self-signed CA (ca.crt, ca.key) in `pki`, made once and kept."""
    pki.mkdir(parents=True, exist_ok=True)
    crt, key = pki / "ca.crt", pki / "ca.key"
    if not (crt.exists() and key.exists()):
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            str(days),
            "-subj",
            f"/CN={cn}",
        )
    return crt, key


def make_service_account_keys(pki: Path) -> None:
    """sa.key / sa.pub: the key pair the apiserver signs and verifies service-account tokens with."""
    if not (pki / "sa.pub").exists():
        openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _san(name: str) -> str:
    try:
        ipaddress.ip_address(name)
        return f"IP:{name}"
    except ValueError:
        return f"DNS:{name}"


def issue_cert(
    out_dir: Path,
    name: str,
    ca_cert: Path,
    ca_key: Path,
    *,
    cn: str,
    orgs: Iterable[str] = (),
    client: bool = True,
    server: bool = False,
    sans: Iterable[str] = (),
    days: int = 3650,
) -> tuple[Path, Path]:
    """An ECDSA P-256 key and a certificate signed by the CA: `<out_dir>/<name>.{crt,key}`.

    `orgs` become O= (Kubernetes groups), `cn` the user; a serving cert (`server=True`) needs
    `sans`: host names and IP addresses, told apart here. Returns (cert, key)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key, crt, csr, ext = (out_dir / f"{name}{s}" for s in (".key", ".crt", ".csr", ".ext"))
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    os.chmod(key, 0o600)
    subject = "".join(f"/O={o}" for o in orgs) + f"/CN={cn}"
    openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    usages = (["clientAuth"] if client else []) + (["serverAuth"] if server else [])
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={','.join(usages)}",
    ]
    alt = [_san(s) for s in sans]
    if alt:
        lines.append("subjectAltName=" + ",".join(alt))
    ext.write_text("\n".join(lines) + "\n")
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_cert),
        "-CAkey",
        str(ca_key),
        "-set_serial",
        "0x" + os.urandom(16).hex(),
        "-days",
        str(days),
        "-sha256",
        "-extfile",
        str(ext),
        "-out",
        str(crt),
    )
    csr.unlink()
    ext.unlink()
    return crt, key


def write_kubeconfig(
    path: Path, server: str, ca: Path, cert: Path, key: Path, user: str, context: str = "kubetune-local"
) -> Path:
    """A kubeconfig for one user, with the CA and the client cert embedded (a self-contained file)."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": context,
        "clusters": [{"name": context, "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": user}}],
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is YAML: no PyYAML needed
    os.chmod(path, 0o600)
    return path
