"""A real Prometheus server and its promtool, for tests, benchmarks and the demo.

`PrometheusServer` is a plain class (like `s3server.MinioServer`): it writes a config of static
scrape targets with a short scrape interval, starts the pinned build from
`hack/build-binaries.sh prometheus` ($KUBETUNE_CACHE/bin/prometheus-<PROMETHEUS_VERSION>/) on a
free 127.0.0.1 port with a temp TSDB, waits until it is ready, and answers PromQL over the HTTP
API. `promtool_check_metrics` lints an exposition text with the real `promtool check metrics`.

    with PrometheusServer({"kubetune-operator": ["127.0.0.1:8080"]}) as prom:
        prom.wait_for_targets()
        prom.query('kubetune_jobs{phase="Running"}')
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from kubetune_dev.procs import free_port, terminate
from kubetune_dev.versions import binary as pinned_binary


class PrometheusError(RuntimeError):
    """The HTTP API answered with status "error" (a bad query, a bad time range)."""


class PrometheusServer:
    """One Prometheus process on 127.0.0.1 scraping static targets.

    scrape: job name -> ["host:port", ...] (each scraped at /metrics every `scrape_interval`).
    scrape_configs: further scrape configs as they are (service discovery, relabelings, static
    targets with labels).
    rule_files: recording/alerting rule files to load (evaluated every `evaluation_interval`).
    """

    def __init__(
        self,
        scrape: Mapping[str, Iterable[str]] | None = None,
        *,
        scrape_configs: Iterable[Mapping[str, Any]] = (),
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        rule_files: Iterable[Path] = (),
        binary: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        work_dir: Path | None = None,
    ) -> None:
        self.scrape = {job: list(targets) for job, targets in (scrape or {}).items()}
        self.scrape_configs = [dict(c) for c in scrape_configs]
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.rule_files = [Path(p) for p in rule_files]
        self.binary = binary
        self.host = host
        self.port = port
        self._own_dir = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="kubetune-prometheus-"))
        self.config_path = self.work_dir / "prometheus.yml"
        self.data_dir = self.work_dir / "data"
        self.log_path = self.work_dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def config(self) -> dict[str, Any]:
        """The prometheus.yml this server runs with."""
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                *({"job_name": job, "static_configs": [{"targets": t}]} for job, t in self.scrape.items()),
                *self.scrape_configs,
            ],
        }

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> PrometheusServer:
        binary = self.binary or pinned_binary("prometheus")  # built on first use
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        for attempt in range(3):  # a free port can be taken between probing and binding
            self.port = self.port or free_port(self.host)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        str(binary),
                        f"--config.file={self.config_path}",
                        f"--storage.tsdb.path={self.data_dir}",
                        f"--web.listen-address={self.host}:{self.port}",
                        "--web.enable-lifecycle",  # POST /-/reload after a config change
                        "--storage.tsdb.retention.time=1d",
                        "--log.level=info",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            if self._wait_ready(timeout):
                return self
            self.stop()
            if attempt < 2 and "address already in use" in self.log_tail().lower():
                self.port = None
                continue
            break
        raise RuntimeError(
            f"Prometheus did not become ready on {self.url} within {timeout:.0f}s; "
            f"log: {self.log_path}\n{self.log_tail()}"
        )

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        return False

    def reload(self, scrape: Mapping[str, Iterable[str]] | None = None) -> None:
        """Rewrite the config (new scrape targets, when given) and have the server reload it."""
        if scrape is not None:
            self.scrape = {job: list(targets) for job, targets in scrape.items()}
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, timeout=15)

    def cleanup(self) -> None:
        """Stop and delete the temp dir (TSDB, config and log)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # -- the HTTP API ----------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer, else PrometheusError."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: a bad query, with Prometheus' reason
            body = json.load(e)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query: [{"metric": {labels}, "value": [t, "v"]}, ...] (a vector result)."""
        data = self.api("query", query=expr, time=at)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """A range query: [{"metric": {labels}, "values": [[t, "v"], ...]}, ...] (a matrix result)."""
        return list(self.api("query_range", query=expr, start=start, end=end, step=step)["result"])

    def value(self, expr: str) -> float | None:
        """The value of an instant query that returns at most one series (None: no series)."""
        result = self.query(expr)
        if len(result) > 1:
            raise PrometheusError(f"{expr!r} returned {len(result)} series: {[r['metric'] for r in result]}")
        return float(result[0]["value"][1]) if result else None

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, with their health and last error."""
        return list(self.api("targets", state="active")["activeTargets"])

    def wait_for_targets(self, timeout: float = 30.0) -> None:
        """Until every static target of `scrape` has been scraped successfully once."""
        deadline = time.monotonic() + timeout
        while True:
            targets = [t for t in self.targets() if t["scrapePool"] in self.scrape]
            wanted = sum(len(t) for t in self.scrape.values())
            if len(targets) >= wanted and all(t["health"] == "up" for t in targets):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"targets not up after {timeout:.0f}s: {targets}")
            time.sleep(0.2)

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rule groups (alerting rules carry their state and active alerts)."""
        return list(self.api("rules")["groups"])


def promtool() -> Path:
    """The pinned promtool (built with the server)."""
    return pinned_binary("promtool")


def promtool_check_metrics(text: str) -> tuple[int, str]:
    """`promtool check metrics` on an exposition text: (exit code, its complaints)."""
    proc = subprocess.run(
        [str(promtool()), "check", "metrics"], input=text.encode(), capture_output=True, timeout=60, check=False
    )
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")
