"""A real S3 server for tests, benchmarks and the demo: SeaweedFS (Apache-2.0) `weed mini`.

`SeaweedS3Server` has the public interface of the MinIO server class it replaces (constructor
arguments, start/stop/cleanup, a context manager, endpoint, env(), s3_spec(), client(),
make_bucket(), proc, data_dir, log_path, region), so callers swap one import. The binary is the
pinned build from `hack/build-binaries.sh weed` ($KUBETUNE_CACHE/bin/weed-<SEAWEEDFS_VERSION>/weed),
built on first use when missing.

    with SeaweedS3Server() as s:
        bucket = s.make_bucket()
        s.client().put_object(Bucket=bucket, Key="k", Body=b"v")

One process runs a master, a volume server, a filer and the S3 gateway, each on its own free
port on `host`; only the S3 port (`port`) is for clients. Credentials: one admin identity with
the access/secret key given (random by default) from an S3 config file; anything else gets
InvalidAccessKeyId / SignatureDoesNotMatch, as from MinIO or AWS.

Not the default (issue 7 kept MinIO): SeaweedFS stores keys as a directory tree and removes a
"directory" whose last object was deleted only in the background (about 2.5 minutes at 4.53), so
until then ListObjectsV2 with a delimiter still returns it as a CommonPrefix. AWS and MinIO drop
it at once; tests/trainer/test_s3_server.py::test_listing_is_consistent_right_after_put_and_delete
and tests/trainer/test_checkpoint_s3.py::test_download_prefix_of_a_model fail here for that.
Other differences: ready to write ~5 s after start (~15 s with a kept data dir), against ~1 s.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kubetune_dev.procs import free_port
from kubetune_dev.versions import binary as pinned_binary

# Internal listeners beside the S3 port, each given a free port (none left at its default, so
# two servers on one host never collide): <name> -> weed mini flag.
_INTERNAL_PORTS = {
    "master": "-master.port",
    "master_grpc": "-master.port.grpc",
    "volume": "-volume.port",
    "volume_grpc": "-volume.port.grpc",
    "filer": "-filer.port",
    "filer_grpc": "-filer.port.grpc",
    "s3_grpc": "-s3.port.grpc",
    "admin": "-admin.port",
    "admin_grpc": "-admin.port.grpc",
}
_PROBE_BUCKET = "kubetune-ready-probe"
_GROWTH_FROZEN = re.compile(r"volume growth (is )?frozen")
_PORT_TAKEN = re.compile(r"address already in use|is not available on|reserved for gRPC", re.I)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as weed binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class SeaweedS3Server:
    """One SeaweedFS server process (master, volume, filer, S3) with a temp data dir and random
    admin credentials; S3 on http://host:port."""

    def __init__(
        self,
        *,
        binary: Path | None = None,
        data_dir: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        log_path: Path | None = None,
        region: str = "us-east-1",
    ) -> None:
        self.binary = binary
        self.host = host
        self.port = port
        self.region = region
        self.access_key = access_key or f"kt{secrets.token_hex(6)}"
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self._own_dir = data_dir is None
        self._tmp = Path(tempfile.mkdtemp(prefix="kubetune-seaweedfs-"))
        self.data_dir = data_dir or self._tmp / "data"
        self.log_path = log_path or self._tmp / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self._growth_frozen = False
        self._buckets = 0

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------
    def _write_s3_config(self) -> Path:
        """The one identity the gateway accepts (outside data_dir: the keys change per start)."""
        path = self._tmp / "s3.json"
        identity = {
            "name": "kubetune",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        path.write_text(json.dumps({"identities": [identity]}))
        path.chmod(0o600)
        return path

    def _command(self, binary: Path, s3_config: Path) -> list[str]:
        ports = [f"{flag}={self.ports[name]}" for name, flag in _INTERNAL_PORTS.items()]
        return [
            str(binary),
            "-logtostderr",  # one log (log_path), no glog files in /tmp
            f"-config_dir={self._tmp}",  # no master/filer/security toml from ~/.seaweedfs or /etc
            # mini: master, volume, filer and S3 in one process, started in dependency order and
            # stopped in reverse (S3 first); its admin server and maintenance worker come along.
            "mini",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-dir={self.data_dir}",
            f"-s3.port={self.port}",
            *ports,
            "-admin.port.legacy=0",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.config={s3_config}",
            "-s3.autoCreateBucket=false",  # as MinIO and AWS: a put to a missing bucket is NoSuchBucket
            "-master.telemetry=false",  # never phones home
        ]

    @property
    def _ports_file(self) -> Path:
        return self.data_dir / "kubetune-ports.json"

    def _pick_ports(self, fixed_port: int | None, reuse: bool) -> None:
        """Free ports for S3 and the internal listeners. A kept data dir reuses the ports of its
        last run: the master's raft identity is its address, and a master at a new address
        starts a new cluster that refuses to grow volumes for the old one's data."""
        saved: dict[str, Any] = {}
        if reuse and self._ports_file.exists():
            saved = json.loads(self._ports_file.read_text())
            if saved.get("host") != self.host:
                saved = {}

        def reuse_or_free(old: int | None) -> int:
            return old if old and _port_free(self.host, old) else free_port(self.host)

        self.port = fixed_port or reuse_or_free(saved.get("s3"))
        self.ports = {name: reuse_or_free(saved.get("ports", {}).get(name)) for name in _INTERNAL_PORTS}
        self._ports_file.write_text(json.dumps({"host": self.host, "s3": self.port, "ports": self.ports}))

    def start(self, timeout: float = 60.0) -> SeaweedS3Server:
        binary = self.binary or pinned_binary("weed")  # built on first use
        self.data_dir.mkdir(parents=True, exist_ok=True)
        s3_config = self._write_s3_config()
        # No AWS_* (weed would add them as a fallback admin identity) and no stray WEED_* settings.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        fixed_port = self.port
        for attempt in range(3):  # a free port can be taken between probing and binding
            self._pick_ports(fixed_port, reuse=attempt == 0 and not self._own_dir)
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                self._command(binary, s3_config),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self._tmp,
                start_new_session=True,  # a Ctrl-C on the test run does not hit it mid-write
            )
            log.close()
            if self._wait_ready(timeout):
                return self
            died = self.proc is not None and self.proc.poll() is not None
            self.stop(remove_data=False)
            if attempt < 2 and died and _PORT_TAKEN.search(self.log_tail()):
                continue
            break
        hint = ""
        if self._growth_frozen:
            hint = (
                f"; the data dir {self.data_dir} belongs to a master at another address (a host IP or port "
                "changed since it was made): delete it to start afresh"
            )
        raise RuntimeError(
            f"SeaweedFS S3 on {self.endpoint} did not become ready (waited up to {timeout:.0f}s){hint}; "
            f"log: {self.log_path}\n{self.log_tail()}"
        )

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/healthz", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def _write_probe(self) -> bool:
        """A put and a delete in a bucket of its own: the gateway answers /healthz seconds before
        it can write (the master defers its first volume allocation, the filer's lock ring forms)."""
        import botocore.exceptions as bce

        client = self.client(max_attempts=1, connect_timeout=2, read_timeout=20)
        try:
            try:
                client.create_bucket(Bucket=_PROBE_BUCKET)
            except bce.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise
            client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=b"ok")
            client.delete_object(Bucket=_PROBE_BUCKET, Key="probe")
            client.delete_bucket(Bucket=_PROBE_BUCKET)
            return True
        except (bce.BotoCoreError, bce.ClientError):
            return False

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if _GROWTH_FROZEN.search(self.log_tail()):
                self._growth_frozen = True  # never writable: see start()'s hint
                return False
            if self._healthy() and self._write_probe():
                return True
            time.sleep(0.1)
        return False

    def stop(self, remove_data: bool = True) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc is not None:  # weed puts a unix socket per gRPC port in /tmp, left behind by a kill
            for name, port in self.ports.items():
                if name.endswith("_grpc"):
                    Path(f"/tmp/seaweedfs-{name.removesuffix('_grpc')}-grpc-{port}.sock").unlink(missing_ok=True)
        if remove_data and self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def cleanup(self) -> None:
        """Stop and delete the temp dir, log included."""
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> SeaweedS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # -- clients ---------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The environment a trainer pod would get from its credentials Secret."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def s3_spec(self) -> Any:
        from kubetune_contract.config import S3Spec

        return S3Spec(endpoint=self.endpoint, region=self.region, force_path_style=True)

    def client(self, **kw: Any) -> Any:
        """A boto3 S3 client with the admin credentials (kwargs go to make_client)."""
        from kubetune_trainer.s3 import make_client

        return make_client(self.s3_spec(), access_key=self.access_key, secret_key=self.secret_key, **kw)

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        self._buckets += 1
        name = f"{prefix}-{self._buckets}-{secrets.token_hex(4)}"[:63]
        self.client().create_bucket(Bucket=name)
        return name
