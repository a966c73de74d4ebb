"""Trainer metrics overhead: what the per-step metric updates and the /metrics server cost a step.

Two measurements in one run:

1. In process: the metric work one optimizer step does (`Run._after_step`'s gauges and counter,
   the goodput facts and the step-time histogram, the MFU gauge) timed over many iterations, and
   one scrape (`generate_latest` of the trainer's registry, checkpoint metrics included).
2. End to end: the real `python -m kubetune_trainer` on a tiny random Llama against a real MinIO,
   alternating runs with the metrics server off (KUBETUNE_METRICS_PORT=off) and on, scraped every
   --scrape-interval seconds (default 0.5 s: 30x Prometheus's default 15 s, an upper bound). Per
   step, between step --warmup and the last: wall time and the process's CPU time (all threads,
   the server's included), marked from inside the process as bench/trainer_throughput.py does.
   Medians over --repeats runs per side.

NVML polling is not measured: it happens at scrape time and needs a GPU and a driver.

    python bench/trainer_metrics_overhead.py --build-tiny 64x2 --seq-len 256 --steps 200
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from kubetune_dev.s3server import MinioServer
from kubetune_dev.tiny_model import build_tiny_model, text_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config, trainer_env
from kubetune_dev.versions import REPO


def in_process(iterations: int) -> dict:
    from prometheus_client import generate_latest

    from kubetune_trainer.checkpoint import _metrics_for
    from kubetune_trainer.goodput import Goodput
    from kubetune_trainer.metrics import TrainerMetrics

    m = TrainerMetrics()
    _metrics_for(m.registry)
    g = Goodput(m, started=time.monotonic())
    g.training_starts()
    m.known(m.flops_per_token, 1e9)

    def one_step(i: int) -> None:
        g.step_done(i, 0.03)

        def record() -> None:
            m.step.set(i)
            m.loss.set(1.0)
            m.lr.set(1e-3)
            m.tps.set(1000.0)
            m.sps.set(4.0)
            m.tokens.inc(1024)
            m.known(m.mfu, 0.4)

        m.safe(record)
        g.progress_fields()

    for i in range(1000):
        one_step(i)
    t0 = time.perf_counter()
    for i in range(iterations):
        one_step(i)
    step_us = (time.perf_counter() - t0) / iterations * 1e6
    n = max(100, iterations // 50)
    t0 = time.perf_counter()
    for _ in range(n):
        body = generate_latest(m.registry)
    scrape_us = (time.perf_counter() - t0) / n * 1e6
    return {"metrics_per_step_us": step_us, "scrape_us": scrape_us, "scrape_bytes": len(body)}


WRAPPER = r"""
import json, os, sys, time
from kubetune_trainer import train
from kubetune_trainer.__main__ import main
WARMUP, STEPS = int(os.environ["BENCH_WARMUP"]), int(os.environ["BENCH_STEPS"])
marks = {}
_after = train.Run._after_step
def after_step(self, loss, tokens, thr):
    if self.state.global_step in (WARMUP, STEPS):
        marks[self.state.global_step] = (time.perf_counter(), time.process_time())
    return _after(self, loss, tokens, thr)
train.Run._after_step = after_step
rc = main([])
(w0, c0), (w1, c1) = marks.get(WARMUP, (0, 0)), marks.get(STEPS, (0, 0))
print("BENCH_RESULT " + json.dumps({"rc": rc, "seconds": w1 - w0, "cpu_seconds": c1 - c0}))
"""


def scraper(port: int, interval: float, stop: threading.Event, counts: list[int]) -> None:
    while not stop.wait(interval):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                r.read()
            counts[0] += 1
        except OSError:
            pass


def events(path: Path, name: str) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == name:
                out.append(e)
    return out


def one_run(args, cfg: dict, minio, work: Path, on: bool, i: int) -> dict:
    name = f"{'on' if on else 'off'}-{i}"
    cfg = {**cfg, "job": {**cfg["job"], "name": f"bench-{name}-{time.time_ns()}"}}
    env = trainer_env(
        work / name,
        cfg,
        minio.env(),
        KUBETUNE_METRICS_PORT="0" if on else "off",
        OMP_NUM_THREADS=args.threads,
        MKL_NUM_THREADS=args.threads,
        BENCH_WARMUP=args.warmup,
        BENCH_STEPS=args.steps,
    )
    log = work / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER], env=env, stdout=out, stderr=out, cwd=REPO)
        stop, counts = threading.Event(), [0]
        if on:
            deadline = time.monotonic() + 120
            while not events(log, "metrics_server_started") and time.monotonic() < deadline:
                time.sleep(0.05)
            port = events(log, "metrics_server_started")[0]["port"]
            threading.Thread(target=scraper, args=(port, args.scrape_interval, stop, counts), daemon=True).start()
        rc = proc.wait()
        stop.set()
    text = log.read_text()
    if rc != 0 or "BENCH_RESULT " not in text:
        raise SystemExit(f"trainer exited {rc}:\n{text[-4000:]}")
    res = json.loads(text.split("BENCH_RESULT ", 1)[1].splitlines()[0])
    if res["rc"] != 0:
        raise SystemExit(f"trainer exited {res['rc']}:\n{text[-4000:]}")
    n = args.steps - args.warmup
    return {
        "on": on,
        "step_ms": res["seconds"] / n * 1e3,
        "step_cpu_ms": res["cpu_seconds"] / n * 1e3,
        "scrapes": counts[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-tiny", default="64x2", metavar="HIDDENxLAYERS")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scrape-interval", type=float, default=0.5)
    ap.add_argument("--iterations", type=int, default=20000, help="in-process iterations")
    ap.add_argument("--threads", default="1")
    args = ap.parse_args()

    micro = in_process(args.iterations)
    print(json.dumps({"in_process": micro}), flush=True)
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-metrics-"))
    hidden, layers = (int(x) for x in args.build_tiny.lower().split("x"))
    model_dir = build_tiny_model(work / "model", hidden=hidden, layers=layers, heads=max(1, hidden // 32))
    data = write_jsonl(work / "train.jsonl", text_records(2000, seed=0, length=40))
    runs: list[dict] = []
    with MinioServer() as minio:
        bucket = minio.make_bucket("bench")
        cfg = trainer_config(
            bucket=bucket,
            endpoint=minio.endpoint,
            model_dir=model_dir,
            data_uri=str(data),
            training={"maxSteps": args.steps, "batchSize": 4, "maxSeqLength": args.seq_len, "loggingSteps": 1},
            checkpoints={"everySteps": None, "everyMinutes": None},
            dataset={"format": "text"},
            progressIntervalSeconds=10.0,
        )
        for i in range(args.repeats):  # alternate: off, on, on, off, ...
            for on in (False, True) if i % 2 == 0 else (True, False):
                r = one_run(args, cfg, minio, work, on, i)
                print(json.dumps(r), flush=True)
                runs.append(r)

    def med(on: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["on"] == on)

    off_ms, on_ms = med(False, "step_ms"), med(True, "step_ms")
    cpu_off, cpu_on = med(False, "step_cpu_ms"), med(True, "step_cpu_ms")
    summary = {
        "machine": platform.node(),
        "date": dt.date.today().isoformat(),
        "model": f"random Llama h{hidden} L{layers}",
        "seq_len": args.seq_len,
        "steps": args.steps,
        "step_ms_off": round(off_ms, 3),
        "step_ms_on": round(on_ms, 3),
        "step_overhead_pct": round(100 * (on_ms - off_ms) / off_ms, 2),
        "step_cpu_ms_off": round(cpu_off, 3),
        "step_cpu_ms_on": round(cpu_on, 3),
        "step_cpu_overhead_pct": round(100 * (cpu_on - cpu_off) / cpu_off, 2),
        "scrapes_per_run": med(True, "scrapes"),
        **{k: round(v, 2) for k, v in micro.items()},
    }
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
