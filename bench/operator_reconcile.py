#!/usr/bin/env python3
"""Operator reconcile benchmark: N FineTuneJobs created at once against the local control plane.

Reports create -> trainer-pod-created latency (p50/p99/max), API requests the operator made per
job (counted exactly from the API server's audit log, the operator runs as its own user), and
the operator's peak RSS. kwok provides one large fake node so pods get scheduled and run, and
the operator follows them to Running (the steady state of a real cluster).

    python bench/operator_reconcile.py --jobs 200 [--jobs 50 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import kubernetes
import psutil
import yaml

from kubetune_dev.controlplane import ControlPlane, create_namespace
from kubetune_dev.jobs import job_manifest
from kubetune_dev.kwok import fake_node_manifest, start_kwok
from kubetune_dev.procs import terminate
from kubetune_dev.versions import REPO
from kubetune_operator.api import GROUP, PLURAL, VERSION

OPERATOR_USER = "kubetune-operator-bench"


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def run(n: int, cp: ControlPlane, api: kubernetes.client.ApiClient, workdir: Path) -> dict:
    core = kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    create_namespace(core, ns)
    core.create_namespaced_secret(
        ns, {"metadata": {"name": "s3-creds"}, "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}}
    )

    created_at: dict[str, float] = {}
    pod_at: dict[str, float] = {}
    done = threading.Event()

    def watch_pods() -> None:
        w = kubernetes.watch.Watch()
        for ev in w.stream(core.list_namespaced_pod, ns, timeout_seconds=600):
            if ev["type"] == "ADDED":
                job = ev["object"].metadata.labels.get("kubetune.io/job-name")
                pod_at.setdefault(job, time.perf_counter())
            if len(pod_at) >= n or done.is_set():
                w.stop()

    watcher = threading.Thread(target=watch_pods, daemon=True)
    watcher.start()
    time.sleep(0.5)

    audit = cp.logs / "audit.log"
    audit_offset = audit.stat().st_size if audit.exists() else 0
    kubeconfig = cp.client_kubeconfig(OPERATOR_USER)
    log = open(workdir / f"operator-{n}.log", "wb")
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "KUBETUNE_METRICS_PORT": "0",
        "KUBETUNE_HEALTH_PORT": "0",
        "KUBETUNE_PREFLIGHT_S3_ENDPOINT": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO / "contract"), str(REPO / "operator"), str(REPO / "trainer")]),
    }
    op = subprocess.Popen(
        [sys.executable, "-m", "kubetune_operator", "--log-format", "plain"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc = psutil.Process(op.pid)
    peak_rss = 0

    time.sleep(3)  # operator up and watching
    jobs = [job_manifest(name=f"j{i:04d}") for i in range(n)]

    # Creating N objects "at once": a few client threads, as kubectl apply of a big file would.
    def create(batch: list[dict]) -> None:
        client = kubernetes.config.new_client_from_config(str(cp.kubeconfig))
        c = kubernetes.client.CustomObjectsApi(client)
        for job in batch:
            created_at[job["metadata"]["name"]] = time.perf_counter()
            c.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)

    threads = [threading.Thread(target=create, args=(jobs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    while len(pod_at) < n and time.monotonic() < deadline:
        peak_rss = max(peak_rss, proc.memory_info().rss)
        time.sleep(0.1)
    for t in threads:
        t.join()

    # Let it settle into steady state (pods Running, statuses written), then count.
    def running_jobs() -> int:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        return sum(1 for j in items if (j.get("status") or {}).get("phase") == "Running")

    settle_deadline = time.monotonic() + 300
    while running_jobs() < n and time.monotonic() < settle_deadline:
        peak_rss = max(peak_rss, proc.memory_info().rss)
        time.sleep(0.5)
    time.sleep(2)
    peak_rss = max(peak_rss, proc.memory_info().rss)
    cpu = proc.cpu_times()
    operator_cpu_s = cpu.user + cpu.system
    done.set()
    op.terminate()
    op.wait(30)

    requests = {"total": 0}
    with open(audit, "rb") as f:
        f.seek(audit_offset)
        for line in f:
            ev = json.loads(line)
            if ev.get("user", {}).get("username") != OPERATOR_USER:
                continue
            requests["total"] += 1
            key = f"{ev['verb']} {ev.get('objectRef', {}).get('resource', '?')}"
            requests[key] = requests.get(key, 0) + 1
    latencies = [pod_at[k] - created_at[k] for k in created_at if k in pod_at]
    running = running_jobs()
    core.delete_namespace(ns)
    return {
        "jobs": n,
        "pods_created": len(latencies),
        "running": running,
        "p50_s": round(percentile(latencies, 50), 3),
        "p99_s": round(percentile(latencies, 99), 3),
        "max_s": round(max(latencies), 3),
        "api_requests_per_job": round(requests["total"] / n, 1),
        "requests_by_kind": dict(sorted(requests.items(), key=lambda kv: -kv[1])[:10]),
        "operator_peak_rss_mb": round(peak_rss / 2**20, 1),
        "operator_cpu_ms_per_job": round(1000 * operator_cpu_s / n, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, action="append", help="N (repeatable); default 50 and 200")
    args = ap.parse_args()
    sizes = args.jobs or [50, 200]
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    cp = ControlPlane(workdir / "cp", audit=True).start()
    kwok = None
    try:
        api = kubernetes.config.new_client_from_config(str(cp.kubeconfig))
        crd = yaml.safe_load((REPO / "manifests/crds/finetunejobs.kubetune.io.yaml").read_text())
        kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
        kwok = start_kwok(cp.kubeconfig, workdir, all_nodes=True)
        node = fake_node_manifest("bench-node", spot=True, cpu="10000", memory="100Ti")
        node["status"]["capacity"]["pods"] = node["status"]["allocatable"]["pods"] = "5000"
        kubernetes.client.CoreV1Api(api).create_node(node)
        time.sleep(5)
        results = [run(n, cp, api, workdir) for n in sizes]
    finally:
        if kwok:
            terminate(kwok)
        cp.stop()
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}; "
        f"date {time.strftime('%Y-%m-%d')}; logs in {workdir}"
    )
    print(
        f"{'jobs':>5} {'pods':>5} {'p50 s':>7} {'p99 s':>7} {'max s':>7} "
        f"{'req/job':>8} {'RSS MB':>7} {'CPU ms/job':>10}"
    )
    for r in results:
        print(
            f"{r['jobs']:>5} {r['pods_created']:>5} {r['p50_s']:>7} {r['p99_s']:>7} {r['max_s']:>7} "
            f"{r['api_requests_per_job']:>8} {r['operator_peak_rss_mb']:>7} {r['operator_cpu_ms_per_job']:>10}"
        )
        print("       requests:", r["requests_by_kind"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
