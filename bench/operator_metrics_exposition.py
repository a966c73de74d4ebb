"""The operator's /metrics at scale: size and exposition time with N jobs (1 and 4 workers each), fed
through the same update path reconcile uses, and the real `promtool check metrics` on the result.

    python bench/operator_metrics_exposition.py [--jobs 100 1000] [--reps 20]

In-process (no HTTP): what one scrape costs the operator's CPU. Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

from prometheus_client import generate_latest

from kubetune_dev.jobs import job_manifest
from kubetune_dev.prometheus import promtool_check_metrics
from kubetune_operator import api
from kubetune_operator.metrics import JobInfo, OperatorMetrics


def job_status(i: int, workers: int) -> dict:
    return {
        "phase": "Running",
        "attempt": 1,
        "preemptions": i % 3,
        "restarts": i % 2,
        "progress": {"step": i, "totalSteps": 1000, "progressPercentage": i % 100, "estimatedRemainingSeconds": 600},
        "cost": {
            "gpuHours": 1.5,
            "spotGpuHours": 1.0,
            "onDemandGpuHours": 0.5,
            "estimatedUsd": "2.8",
            "onDemandUsd": "4",
        },
        "workers": [
            {
                "name": f"j{i}-a1-w{r}",
                "rank": r,
                "attempt": 1,
                "phase": "Running",
                "node": f"n{i % 50}",
                "capacityType": "spot",
            }
            for r in range(workers)
        ],
    }


def measure(n: int, reps: int) -> dict:
    m = OperatorMetrics()
    one = api.FineTuneJobSpec.model_validate(
        job_manifest(name="x", resources={"gpus": 1, "gpuType": "NVIDIA-L4"})["spec"]
    )
    four = api.FineTuneJobSpec.model_validate(
        job_manifest(name="x", resources={"gpus": 1, "gpuType": "NVIDIA-L4", "workers": 4})["spec"]
    )
    for i in range(n):
        workers = 4 if i % 2 else 1
        m.jobs.update(f"ns{i % 20}", f"job-{i}", job_status(i, workers), JobInfo.of(four if workers == 4 else one))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        text = generate_latest(m.registry)
        times.append(time.perf_counter() - t0)
    rc, complaints = promtool_check_metrics(text.decode())
    series = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))
    return {
        "jobs": n,
        "bytes": len(text),
        "series": series,
        "p50_ms": 1000 * statistics.median(times),
        "max_ms": 1000 * max(times),
        "promtool": "ok" if rc == 0 and not complaints.strip() else f"rc={rc} {complaints.strip()[:200]}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    print(f"# {platform.node()} {platform.machine()} python {platform.python_version()} {date.today()}")
    print(f"{'jobs':>6} {'KiB':>8} {'series':>7} {'p50 ms':>8} {'max ms':>8}  promtool")
    for n in args.jobs:
        r = measure(n, args.reps)
        size = f"{r['jobs']:>6} {r['bytes'] / 1024:>8.0f} {r['series']:>7}"
        print(f"{size} {r['p50_ms']:>8.1f} {r['max_ms']:>8.1f}  {r['promtool']}")


if __name__ == "__main__":
    main()
