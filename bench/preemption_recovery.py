#!/usr/bin/env python3
"""Preemption recovery on the real local node (kubetune_dev.stack): how long from a spot
reclaim to the new trainer pod Running and to its first training step, how much of that is
the operator, and how much training work each preemption loses.

Two kinds of reclaim, one job each:
- eviction (the Eviction API, as a node drainer acting on a spot notice does): SIGTERM, the
  trainer checkpoints, exit 3;
- node replaced (the VM vanishes with no notice; the Node object is deleted and a new node joins):
  work since the last periodic checkpoint is lost.

Also reports the stack's bring-up time (warm: binaries, venv and images cached).

    python bench/preemption_recovery.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import urllib.request

import kubernetes
import yaml

from kubetune_dev.controlplane import create_namespace
from kubetune_dev.stack import LocalStack, default_state_dir
from kubetune_dev.versions import REPO

NS = f"recovery-{os.getpid()}"  # a fresh namespace: the stack's state dir persists across runs


def progress_of(ip: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{ip}:9400/progress", timeout=0.5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def run_case(stack: LocalStack, name: str, how: str) -> dict:
    api = stack.api()
    custom = kubernetes.client.CustomObjectsApi(api)
    core = kubernetes.client.CoreV1Api(api)
    job = yaml.safe_load((REPO / "manifests/examples/cpu-lora-tiny.yaml").read_text())
    job["metadata"] = {"name": name}
    job["spec"]["s3"]["endpoint"] = stack.minio.endpoint
    job["spec"]["training"].update(maxSteps=3000, loggingSteps=5)
    job["spec"]["checkpoints"].update(everySteps=100)
    custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", NS, "finetunejobs", job)

    def status() -> dict:
        return (
            custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", NS, "finetunejobs", name).get("status") or {}
        )

    pod0 = f"{name}-a0-w0"
    ip0 = None
    while True:  # wait for the first checkpoint plus some steps, reading the trainer directly
        try:
            p = core.read_namespaced_pod(pod0, NS)
        except kubernetes.client.rest.ApiException:
            time.sleep(0.2)
            continue
        ip0 = p.status.pod_ip
        rec = progress_of(ip0) if ip0 else None
        if rec and (rec.get("lastCheckpoint") or {}).get("step", 0) >= 100 and rec["step"] >= 150:
            break
        time.sleep(0.2)
    step_at_reclaim = progress_of(ip0)["step"]
    t0 = time.monotonic()
    if how == "eviction":
        core.create_namespaced_pod_eviction(pod0, NS, {"metadata": {"name": pod0, "namespace": NS}})
    else:
        node = p.spec.node_name
        stack.replace_node()
        core.delete_node(node)
    marks: dict[str, float] = {}
    pod1 = f"{name}-a1-w0"
    while "first_step" not in marks and time.monotonic() - t0 < 600:
        try:
            core.read_namespaced_pod(pod0, NS)
        except kubernetes.client.rest.ApiException:
            marks.setdefault("old_pod_gone", time.monotonic() - t0)
        try:
            p1 = core.read_namespaced_pod(pod1, NS)
            marks.setdefault("new_pod_created", time.monotonic() - t0)
            if p1.status.phase == "Running":
                marks.setdefault("new_pod_running", time.monotonic() - t0)
                rec = progress_of(p1.status.pod_ip) if p1.status.pod_ip else None
                if rec and rec.get("resumedFromStep") is not None and rec["step"] > rec["resumedFromStep"]:
                    marks["first_step"] = time.monotonic() - t0
                    marks["resumed_from"] = rec["resumedFromStep"]
        except kubernetes.client.rest.ApiException:
            pass
        time.sleep(0.1)
    custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", NS, "finetunejobs", name)
    return {
        "case": how,
        "step_at_reclaim": step_at_reclaim,
        "resumed_from": marks.get("resumed_from"),
        "steps_lost": step_at_reclaim - marks.get("resumed_from", 0),
        "old_pod_gone_s": round(marks.get("old_pod_gone", float("nan")), 2),
        "operator_s": round(marks.get("new_pod_created", float("nan")) - marks.get("old_pod_gone", float("nan")), 2),
        "new_pod_running_s": round(marks.get("new_pod_running", float("nan")), 2),
        "first_step_s": round(marks.get("first_step", float("nan")), 2),
    }


def main() -> int:
    stack = LocalStack(default_state_dir(), progress_poll_seconds=1.0)
    t = time.monotonic()
    stack.up()
    bring_up = time.monotonic() - t
    try:
        stack.seed_demo_data(hidden=256, layers=4)
        core = kubernetes.client.CoreV1Api(stack.api())
        create_namespace(core, NS)
        stack.s3_secret(NS)
        results = [run_case(stack, "rec-evict", "eviction"), run_case(stack, "rec-node", "node replaced")]
        core.delete_namespace(NS)
    finally:
        stack.down()
    print(f"machine: {platform.node()} {os.cpu_count()} cores; date {time.strftime('%Y-%m-%d')}")
    print(f"warm bring-up: {bring_up:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in stack.timings.items())})")
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
