"""`make demo`: a real LoRA fine-tune on a local Kubernetes cluster, surviving a spot preemption.

1. boots the local cluster (control plane + a real kubelet/containerd node), or uses
   $KUBETUNE_KUBECONFIG (e.g. kind) when set;
2. builds and loads the operator and trainer images, starts MinIO and Prometheus (scraping the
   operator and the trainer pods, the chart's alerts loaded; its URL printed), `helm install`s the chart;
3. puts a tiny Llama and an instruction dataset into MinIO;
4. applies manifests/examples/cpu-lora-tiny.yaml, shows progress live, evicts the trainer pod
   part-way (as a spot reclaim would), and follows the job to Succeeded;
5. prints where the adapter is, a utilization/cost summary read from Prometheus beside the job's
   status (GPU/CPU-hours, USD, spot savings, goodput, USD lost to the preemption), and how to look
   at the job with kubectl and Prometheus.

The cluster stays up afterwards (`--down` tears it down) so you can poke at it.

    python -m kubetune_dev.demo [--preempt-at PCT] [--state-dir DIR]
    python -m kubetune_dev.demo --down
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from kubetune_dev import demo_summary
from kubetune_dev.jobs import example
from kubetune_dev.stack import LocalStack, default_state_dir
from kubetune_dev.versions import binary

NAMESPACE = "default"
JOB = "tiny-lora"


def bar(pct: int, width: int = 30) -> str:
    filled = width * pct // 100
    return "#" * filled + "-" * (width - filled)


def status_line(st: dict) -> str:
    prog = st.get("progress") or {}
    pct = prog.get("progressPercentage") or 0
    parts = [
        f"{st.get('phase', 'Pending'):<10}",
        f"[{bar(pct)}] {pct:3d}%",
        f"step {prog.get('step', 0)}/{prog.get('totalSteps', '?')}",
    ]
    if prog.get("loss") is not None:
        parts.append(f"loss {prog['loss']:.3f}")
    if prog.get("estimatedRemainingSeconds") is not None:
        parts.append(f"ETA {prog['estimatedRemainingSeconds']}s")
    parts.append(f"preemptions {st.get('preemptions', 0)}")
    if prog.get("resumedFromStep"):
        parts.append(f"resumed@{prog['resumedFromStep']}")
    if (st.get("cost") or {}).get("estimatedUsd"):
        parts.append(f"${st['cost']['estimatedUsd']}")
    return "  ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--state-dir", type=Path, default=default_state_dir())
    ap.add_argument("--preempt-at", type=int, default=40, help="evict the trainer at this progress %% (0: never)")
    ap.add_argument("--down", action="store_true", help="only stop the cluster an earlier demo left running")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()

    import kubernetes

    given = os.environ.get("KUBETUNE_KUBECONFIG")
    stack = LocalStack(args.state_dir, Path(given) if given else None)
    if args.down:
        stack.stop_leftovers()
        print("== stopped the demo cluster", flush=True)
        return 0
    print("== kubetune demo: bringing up the local cluster, images, MinIO and the operator chart", flush=True)
    stack.up()
    print(f"== Prometheus at {stack.prometheus.url} (the operator and the trainer pods, every second)", flush=True)
    try:
        uris = stack.seed_demo_data(hidden=256, layers=4)  # big enough to watch it train for a minute
        print(f"== tiny model at {uris['model']}, data at {uris['dataset']}", flush=True)
        stack.s3_secret(NAMESPACE)
        job = example("cpu-lora-tiny.yaml")
        job["spec"]["s3"]["endpoint"] = stack.minio.endpoint  # no cluster DNS here: the host's IP
        api = stack.api()
        custom = kubernetes.client.CustomObjectsApi(api)
        core = kubernetes.client.CoreV1Api(api)
        try:
            custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs", JOB)
            while True:  # a previous demo's job: gone before we start again
                custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs", JOB)
                time.sleep(1)
        except kubernetes.client.rest.ApiException:
            pass
        custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs", job)
        print(f"== FineTuneJob {JOB} applied; following it (Ctrl-C leaves it running)", flush=True)

        tty = sys.stdout.isatty()
        preempted = args.preempt_at <= 0
        last = ""
        deadline = time.monotonic() + args.timeout
        st: dict = {}
        while time.monotonic() < deadline:
            got = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs", JOB)
            st = got.get("status") or {}
            line = status_line(st)
            if line != last:
                print(("\r" + line + "   ") if tty else line, end="" if tty else "\n", flush=True)
                last = line
            if st.get("phase") in ("Succeeded", "Failed"):
                break
            pct = (st.get("progress") or {}).get("progressPercentage") or 0
            if not preempted and st.get("phase") == "Running" and pct >= args.preempt_at and st.get("lastCheckpoint"):
                pod = st["workers"][0]["name"]
                print(
                    f"\n== injecting a spot preemption: evicting {pod} (the trainer checkpoints on SIGTERM)", flush=True
                )
                core.create_namespaced_pod_eviction(pod, NAMESPACE, {"metadata": {"name": pod, "namespace": NAMESPACE}})
                preempted = True
            time.sleep(1)
        print()
        if st.get("phase") != "Succeeded":
            print(f"== the job did not succeed: phase={st.get('phase')} message={st.get('message')}", flush=True)
            print(stack.kubectl("describe", "ftj", JOB, check=False).stdout)
            return 1
        out = st.get("outputUri", "")
        objects = [o.key for o in output_objects(stack, out)]
        print(
            f"== Succeeded after {st.get('preemptions', 0)} preemption(s); resumed from step "
            f"{(st.get('progress') or {}).get('resumedFromStep')}; "
            f"cost estimate ${(st.get('cost') or {}).get('estimatedUsd')}"
        )
        print(f"== adapter and model card at {out}:")
        for key in objects:
            print(f"     {key}")
        demo_summary.wait_scraped(stack.prometheus, NAMESPACE, JOB, st)
        print(f"== utilization and cost of {JOB}:")
        print(demo_summary.summary(stack.prometheus, NAMESPACE, JOB, st))
        kc = stack.kubeconfig
        print("== look around:")
        print(f"     export KUBECONFIG={kc}")
        print(f"     {binary('kubectl')} get ftj {JOB}")
        print(f"     {binary('kubectl')} describe ftj {JOB}")
        print(f"     {binary('kubectl')} get events --field-selector involvedObject.name={JOB}")
        print(f"     {stack.prometheus.url}/alerts, /targets, /graph?g0.expr=kubetune_job_cost_usd_total")
        return 0
    finally:
        print(f"== the cluster keeps running (state in {args.state_dir}); `make demo-down` stops it", flush=True)


def output_objects(stack: LocalStack, uri: str) -> list:
    from kubetune_trainer import s3 as s3lib

    return s3lib.list_objects(stack.minio.client(), uri) if uri else []


if __name__ == "__main__":
    sys.exit(main())
