"""Images without a registry: hand-written docker-archive tarballs (the pause image and a tiny
busybox test image), and importing archives into a local node's containerd.

    python -m kubetune_dev.imagestore import --state-dir DIR ARCHIVE...   # into that node (hack/images.sh)
    python -m kubetune_dev.imagestore build-test-image [--tag T]          # prints the archive path
    python -m kubetune_dev.imagestore build-pause-image                   # prints the archive path

Pods must use ``imagePullPolicy: Never`` or ``IfNotPresent`` with a non-latest tag. Bigger
images come from ``hack/images.sh`` (buildah).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from kubetune_dev.host import ensure_packages, log, run
from kubetune_dev.versions import cache_dir, kubernetes_bin_dir, versions

PAUSE_BUILD_PACKAGES = {
    "gcc": "/usr/bin/gcc",  # compiles pause.c
    "libc6-dev": "/usr/lib/x86_64-linux-gnu/libc.a",  # static glibc for pause
}
TEST_IMAGE_PACKAGES = {"busybox-static": "/bin/busybox"}
DEFAULT_PAUSE_IMAGE = "localhost/kubetune-pause:3.10.1"
DEFAULT_TEST_IMAGE = "localhost/kubetune-busybox:1.35.0"


def _images_cache(cache: Path | None) -> Path:
    return cache if cache is not None else cache_dir() / "images"


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.linkname = kind, mode, size, link
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
    return ti


def write_docker_archive(out: Path, tag: str, entries: list[tuple], config: dict[str, Any]) -> Path:
    """Write a one-layer image as a `docker save`-style archive that `ctr images import` loads.

    entries: (path_in_image, "dir"|"file"|"symlink", payload, mode) where payload is the host
    file path or the bytes (file), the link target (symlink) or None (dir); parents must come first.
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
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        # the same string as before the move: changing it would change every digest
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "kubetune hack/localnode.py"}],
    }
    cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
    cfg_name = hashlib.sha256(cfg_bytes).hexdigest() + ".json"
    manifest = [{"Config": cfg_name, "RepoTags": [tag], "Layers": [f"{diff_id}/layer.tar"]}]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
        for name, data in (
            (f"{diff_id}/layer.tar", layer_bytes),
            (cfg_name, cfg_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            t.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    tmp.replace(out)
    return out


def pause_source(bin_dir: Path, k8s_version: str) -> Path:
    for p in (
        bin_dir / "pause.c",
        cache_dir() / "go-mod" / "k8s.io" / f"kubernetes@{k8s_version}" / "build/pause/linux/pause.c",
    ):
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"pause.c not found in {bin_dir} nor in the Go module cache (run hack/build-binaries.sh kubernetes)"
    )


def build_pause_image(tag: str, bin_dir: Path, k8s_version: str, cache: Path | None = None) -> Path:
    """Compile pause.c statically and wrap it as `tag`; cached by source hash + tag."""
    cache = _images_cache(cache)
    src = pause_source(bin_dir, k8s_version)
    key = hashlib.sha256(src.read_bytes() + tag.encode()).hexdigest()[:12]
    out = cache / f"pause-{key}.tar"
    if out.exists():
        return out
    ensure_packages(PAUSE_BUILD_PACKAGES)
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / f"pause-{key}.bin"
    version = tag.rsplit(":", 1)[-1]
    run(["gcc", "-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{version}-kubetune", "-o", str(binary), str(src)])
    run(["strip", str(binary)], check=False)
    write_docker_archive(
        out,
        tag,
        [("/pause", "file", str(binary), 0o755)],
        {"Entrypoint": ["/pause"], "User": "65535:65535", "WorkingDir": "/"},
    )
    binary.unlink()
    return out


def build_busybox_image(tag: str, cache: Path | None = None) -> Path:
    """A tiny test image from Debian's busybox-static: /bin/busybox plus one symlink per applet."""
    cache = _images_cache(cache)
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
    passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
    entries += [("/etc/passwd", "file", passwd, 0o644), ("/etc/group", "file", b"root:x:0:\nnogroup:x:65534:\n", 0o644)]
    write_docker_archive(
        out,
        tag,
        entries,
        {
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/",
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
    )
    return out


class ImageStore:
    """A node's containerd image store (CRI namespace k8s.io), with a record of what was imported
    (`<node_dir>/imported.json`) so an unchanged archive is not imported twice."""

    def __init__(self, node_dir: Path, containerd_address: str) -> None:
        self.node_dir, self.containerd_address = node_dir, containerd_address

    @classmethod
    def of_state_dir(cls, state_dir: Path) -> ImageStore:
        """The store of the node a `LocalNode` (or `python -m kubetune_dev.node up`) made under `state_dir`."""
        node_dir = Path(state_dir).resolve() / "node"
        meta = json.loads((node_dir / "node.json").read_text())
        return cls(node_dir, meta["containerd_address"])

    def ctr(self, *args: str, check: bool = False) -> Any:
        return run(["ctr", "--address", self.containerd_address, "-n", "k8s.io", *args], check=check)

    def _snapshotter(self) -> str:
        try:
            return json.loads((self.node_dir / "node.json").read_text()).get("snapshotter", "overlayfs")
        except (OSError, ValueError):
            return "overlayfs"

    def import_image(self, archive: str | Path, *, snapshotter: str | None = None, force: bool = False) -> list[str]:
        """Load a docker-archive / OCI archive; returns the image refs. Skipped when this containerd
        already imported the same file (size+mtime) and still has its refs: re-importing a 6 GB
        trainer archive costs over a minute."""
        archive = Path(archive).resolve()
        st = archive.stat()
        key = f"{st.st_size}:{st.st_mtime_ns}"
        stamps_file = self.node_dir / "imported.json"
        try:
            stamps = json.loads(stamps_file.read_text())
        except (OSError, ValueError):
            stamps = {}
        prev = stamps.get(str(archive))
        if not force and prev and prev["key"] == key:
            have = set(self.ctr("images", "ls", "-q").stdout.split())
            if prev["refs"] and set(prev["refs"]) <= have:
                return prev["refs"]
        t0 = time.monotonic()
        snap = snapshotter or self._snapshotter()
        res = self.ctr("images", "import", "--snapshotter", snap, str(archive), check=True)
        refs = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("unpacking ")]
        stamps[str(archive)] = {"key": key, "refs": refs}
        stamps_file.write_text(json.dumps(stamps, indent=2) + "\n")
        log(f"imported {archive.name} ({', '.join(refs)}) in {time.monotonic() - t0:.1f}s")
        self.prune_replaced()
        return refs

    def prune_replaced(self) -> list[str]:
        """Drop the image-ID records (`sha256:<id>`, which the CRI plugin adds to every image it
        uses) whose image no tag names any more: a rebuilt 6 GB trainer otherwise keeps the old one
        on disk until the kubelet's image GC runs at 85% disk — which once took the pause image too."""
        listing = self.ctr("images", "ls").stdout.splitlines()[1:]
        rows = [line.split()[:3] for line in listing if len(line.split()) >= 3]  # REF TYPE DIGEST
        named = {digest for ref, _, digest in rows if not ref.startswith("sha256:")}
        stale = [ref for ref, _, digest in rows if ref.startswith("sha256:") and digest not in named]
        if stale:
            self.ctr("images", "rm", *stale)
            log(f"removed {len(stale)} replaced image(s)")
        return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("import", help="import archives into the node under --state-dir")
    s.add_argument("--state-dir", required=True)
    s.add_argument("archives", nargs="+")
    s = sub.add_parser("build-test-image", help="write the busybox test image archive; prints its path")
    s.add_argument("--tag", default=None)
    sub.add_parser("build-pause-image", help="write the pause image archive; prints its path")
    a = p.parse_args(argv)
    pinned = versions()
    if a.cmd == "import":
        store = ImageStore.of_state_dir(Path(a.state_dir))
        for archive in a.archives:
            store.import_image(archive)
    elif a.cmd == "build-test-image":
        print(build_busybox_image(a.tag or pinned.get("BUSYBOX_TEST_IMAGE", DEFAULT_TEST_IMAGE)))
    else:
        print(
            build_pause_image(
                pinned.get("PAUSE_IMAGE", DEFAULT_PAUSE_IMAGE), kubernetes_bin_dir(), pinned["KUBERNETES_VERSION"]
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
