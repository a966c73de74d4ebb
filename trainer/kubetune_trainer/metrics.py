"""Prometheus metrics and the trainer's HTTP server (/metrics, /progress, /healthz).

The server runs in a daemon thread; nothing here may fail training: every update is wrapped, and
a port that cannot be bound only logs a warning. GPU utilization and memory come from NVML at
scrape time when `pynvml` (the `gpu` extra: nvidia-ml-py) and a driver are present; on CPU those
series are absent, not zero, and an NVML error at scrape time drops the series it broke (one log
line per process), never the scrape.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from . import logs


@dataclass
class Throughput:
    """Tokens, samples and steps per second since the last reset (the last logging window)."""

    t0: float = field(default_factory=time.monotonic)
    tokens: int = 0
    samples: int = 0
    steps: int = 0

    def reset(self) -> None:
        self.t0, self.tokens, self.samples, self.steps = time.monotonic(), 0, 0, 0

    def rates(self) -> tuple[float, float, float]:
        dt = max(1e-9, time.monotonic() - self.t0)
        return self.tokens / dt, self.samples / dt, self.steps / dt


class _NvmlCollector:
    """GPU utilization (ratio) and memory used (bytes) per visible GPU, read at scrape time."""

    def __init__(self, nvml: Any = None) -> None:
        self._nvml: Any = None  # the pynvml module, when a driver answers
        self._handles: list[Any] = []
        self._warned = False
        try:
            if nvml is None:
                import pynvml  # lazily: the `gpu` extra, absent on CPU images

                nvml = pynvml

            nvml.nvmlInit()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            self._nvml = nvml
        except ImportError:
            pass
        except Exception as e:  # installed, but no driver (a CPU node): absent
            logs.log("nvml_unavailable", "info", error=f"{type(e).__name__}: {e}")

    @property
    def available(self) -> bool:
        return self._nvml is not None and bool(self._handles)

    def collect(self):
        if not self.available:
            return []
        util = GaugeMetricFamily("kubetune_trainer_gpu_utilization_ratio", "GPU utilization (0-1)", labels=["gpu"])
        mem = GaugeMetricFamily("kubetune_trainer_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("kubetune_trainer_gpu_memory_total_bytes", "GPU memory size", labels=["gpu"])
        nvml = self._nvml
        for i, h in enumerate(self._handles):
            try:
                u = nvml.nvmlDeviceGetUtilizationRates(h)
                m = nvml.nvmlDeviceGetMemoryInfo(h)
                util.add_metric([str(i)], u.gpu / 100.0)
                mem.add_metric([str(i)], float(m.used))
                total.add_metric([str(i)], float(m.total))
            except Exception as e:  # e.g. NVMLError_GpuIsLost: this GPU's series are absent
                if not self._warned:
                    self._warned = True
                    logs.log("nvml_scrape_failed", "warning", gpu=i, error=f"{type(e).__name__}: {e}")
        return [f for f in (util, mem, total) if f.samples]

    def describe(self):
        return []


class TrainerMetrics:
    def __init__(self, nvml: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge("kubetune_trainer_step", "Optimizer steps completed", registry=r)
        self.total_steps = Gauge("kubetune_trainer_total_steps", "Optimizer steps planned", registry=r)
        self.loss = Gauge("kubetune_trainer_loss", "Training loss of the last logged step", registry=r)
        self.eval_loss = Gauge("kubetune_trainer_eval_loss", "Last evaluation loss", registry=r)
        self.lr = Gauge("kubetune_trainer_learning_rate", "Current learning rate", registry=r)
        self.tps = Gauge("kubetune_trainer_tokens_per_second", "Training throughput, tokens (all ranks)", registry=r)
        self.sps = Gauge(
            "kubetune_trainer_samples_per_second", "Training throughput, sequences (all ranks)", registry=r
        )
        self.tokens = Counter("kubetune_trainer_tokens", "Tokens trained on (all ranks)", registry=r)
        # (checkpoint upload metrics, kubetune_checkpoint_*, come from CheckpointStore on this registry)
        self.checkpoint_save = Gauge(
            "kubetune_trainer_checkpoint_local_save_seconds",
            "Training time blocked by the last local checkpoint save",
            registry=r,
        )
        # goodput facts (this process; see goodput.py) and MFU (mfu.py)
        self.step_seconds = Histogram(
            "kubetune_trainer_step_seconds",
            "Wall time of one optimizer step (all micro-batches, the step's all-reduce)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.productive_seconds = Counter(
            "kubetune_trainer_productive_seconds",
            "Wall time inside optimizer steps that advanced the global step for the first time",
            registry=r,
        )
        self.recomputed_steps = Counter(
            "kubetune_trainer_recomputed_steps",
            "Optimizer steps trained again after resuming from a checkpoint older than the highest step reached",
            registry=r,
        )
        self.recomputed_seconds = Counter(
            "kubetune_trainer_recomputed_seconds",
            "Wall time of the optimizer steps trained again (see kubetune_trainer_recomputed_steps)",
            registry=r,
        )
        self.checkpoint_blocked_seconds = Counter(
            "kubetune_trainer_checkpoint_blocked_seconds",
            "Training time spent in checkpoint saves (local write and staging)",
            registry=r,
        )
        # registered once known: the startup at the first step, the model's FLOPs per token after
        # loading, MFU once a GPU peak is known
        self.startup_seconds = Gauge(
            "kubetune_trainer_startup_seconds", "Process start to the first optimizer step", registry=None
        )
        self.flops_per_token = Gauge(
            "kubetune_trainer_model_flops_per_token",
            "Model FLOPs to train on one token (forward + backward; see docs/metrics.md)",
            registry=None,
        )
        self.mfu = Gauge(
            "kubetune_trainer_mfu_ratio", "Model FLOPs utilization over the last logging window (0-1)", registry=None
        )
        self._known: set[int] = set()
        self.nvml = _NvmlCollector(nvml)
        if self.nvml.available:
            r.register(self.nvml)

    def known(self, gauge: Gauge, value: float) -> None:
        """Set one of the gauges that exist only once known (startup_seconds, flops_per_token, mfu)."""
        if id(gauge) not in self._known:
            self.registry.register(gauge)
            self._known.add(id(gauge))
        gauge.set(value)

    def record_step(
        self, step: int, loss: float, lr: float, tps: float, sps: float, tokens: int, mfu: float | None
    ) -> None:
        """One optimizer step's numbers (rank 0)."""
        self.step.set(step)
        self.loss.set(loss)
        self.lr.set(lr)
        self.tps.set(tps)
        self.sps.set(sps)
        self.tokens.inc(tokens)
        if mfu is not None:
            self.known(self.mfu, mfu)

    def safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            pass


class _Server(ThreadingHTTPServer):
    """The HTTP server, carrying what the handler serves."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: TrainerMetrics, progress: Callable[[], dict]) -> None:
        super().__init__(address, _Handler)
        self.metrics = metrics
        self.progress = progress


class _Handler(BaseHTTPRequestHandler):
    server_version = "kubetune-trainer"
    server: _Server

    def do_GET(self):  # noqa: N802
        try:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype = generate_latest(self.server.metrics.registry), "text/plain; version=0.0.4; charset=utf-8"
            elif path == "/progress":
                body, ctype = json.dumps(self.server.progress()).encode(), "application/json"
            elif path in ("/healthz", "/"):
                body, ctype = b"ok\n", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except Exception:
            try:
                self.send_error(500)
            except Exception:
                pass

    def log_message(self, *args):  # no access log lines
        pass


class MetricsServer:
    def __init__(self, metrics: TrainerMetrics, progress: Callable[[], dict], port: int, host: str = "0.0.0.0"):
        self.port = None
        self._httpd = None
        try:
            httpd = _Server((host, port), metrics, progress)
        except OSError as e:
            logs.log("metrics_server_unavailable", "warning", port=port, error=str(e))
            return
        self._httpd = httpd
        self.port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
        logs.log("metrics_server_started", port=self.port)

    def close(self) -> None:
        if self._httpd is not None:
            try:
                self._httpd.shutdown()
                self._httpd.server_close()
            except Exception:
                pass
