"""A real MinIO server (S3-compatible) for tests, benchmarks and the demo.

`MinioServer` is a plain class: the pytest fixtures (tests/fixtures/minio.py), bench/ and
`kubetune_dev.stack` all start it. The binary is the pinned build from
`hack/build-binaries.sh minio` ($KUBETUNE_CACHE/bin/minio-<MINIO_VERSION>/minio), built on
first use when missing.

    with MinioServer() as m:
        bucket = m.make_bucket()
        m.client().put_object(Bucket=bucket, Key="k", Body=b"v")
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kubetune_dev.procs import free_port, terminate
from kubetune_dev.versions import binary as pinned_binary


class MinioServer:
    """One MinIO server process on 127.0.0.1 with a temp data dir and random root credentials."""

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
        self._tmp = Path(tempfile.mkdtemp(prefix="kubetune-minio-"))
        self.data_dir = data_dir or self._tmp / "data"
        self.log_path = log_path or self._tmp / "minio.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._buckets = 0

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> MinioServer:
        binary = self.binary or pinned_binary("minio")  # built on first use
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_REGION": self.region,
            "MINIO_BROWSER": "off",  # no console listener on another port
            "MINIO_UPDATE": "off",  # never phones home
            "MINIO_CI_CD": "on",  # allow a data dir on the root disk
        }
        for attempt in range(3):  # a free port can be taken between probing and binding
            port = self.port or free_port(self.host)
            self.port = port
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [str(binary), "server", "--address", f"{self.host}:{port}", str(self.data_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C on the test run does not hit it mid-write
            )
            log.close()
            if self._wait_ready(timeout):
                return self
            self.stop(remove_data=False)
            if attempt < 2 and "address already in use" in self.log_tail().lower():
                self.port = None
                continue
            break
        raise RuntimeError(
            f"MinIO did not become ready on {self.endpoint} within {timeout:.0f}s; "
            f"log: {self.log_path}\n{self.log_tail()}"
        )

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        url = f"{self.endpoint}/minio/health/live"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        return False

    def stop(self, remove_data: bool = True) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, timeout=10)
        if remove_data and self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def cleanup(self) -> None:
        """Stop and delete the temp dir, log included."""
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> MinioServer:
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
        """A boto3 S3 client with the root credentials (kwargs go to make_client)."""
        from kubetune_trainer.s3 import make_client

        return make_client(self.s3_spec(), access_key=self.access_key, secret_key=self.secret_key, **kw)

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        self._buckets += 1
        name = f"{prefix}-{self._buckets}-{secrets.token_hex(4)}"[:63]
        self.client().create_bucket(Bucket=name)
        return name
