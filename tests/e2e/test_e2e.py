"""End to end on a real node: the CPU trainer image runs in pods on a real kubelet + containerd,
checkpoints to MinIO, is preempted (Eviction API; a Node replaced), resumes, and finishes. The
operator runs in-cluster from the Helm chart, under its own ServiceAccount. The stack's Prometheus
scrapes the operator and the trainer pods (the chart's monitors, kubetune_dev.stack_monitoring):
after the eviction, every panel of the shipped dashboards is queried over the job's lifetime and
agrees with the job's status.

They boot their own stack (kubetune_dev.stack). hack/kind-e2e.sh runs the same module against
a kind cluster by setting KUBETUNE_E2E_KUBECONFIG.
"""

from __future__ import annotations

import calendar
import os
import time
import uuid
from pathlib import Path

import kubernetes
import pytest
import yaml

from kubetune_dev import demo_summary
from kubetune_dev.controlplane import create_namespace
from kubetune_dev.dashboard_queries import GPU_OR_EXTERNAL, last, panel_results, using
from kubetune_dev.stack import LocalStack, default_state_dir
from tests.fixtures.control_plane import wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"


@pytest.fixture(scope="session")
def stack():
    given = os.environ.get("KUBETUNE_E2E_KUBECONFIG")
    s = LocalStack(default_state_dir(), Path(given) if given else None, progress_poll_seconds=1.0)
    try:
        s.up()
        s.uris = s.seed_demo_data(records=400)
        yield s
    finally:
        s.down()


@pytest.fixture
def ns(stack):
    core = kubernetes.client.CoreV1Api(stack.api())
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    create_namespace(core, name)
    stack.s3_secret(name)
    yield name
    core.delete_namespace(name)


class Job:
    def __init__(self, stack, ns: str, name: str):
        self.stack, self.ns, self.name = stack, ns, name
        api = stack.api()
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)

    def create(self, **spec) -> Job:
        job = yaml.safe_load((REPO / "manifests" / "examples" / "cpu-lora-tiny.yaml").read_text())
        job["metadata"] = {"name": self.name}
        job["spec"]["s3"]["endpoint"] = self.stack.minio.endpoint
        job["spec"]["baseModel"]["uri"] = self.stack.uris["model"]
        job["spec"]["dataset"]["uri"] = self.stack.uris["dataset"]
        job["spec"]["training"].update(maxSteps=600, loggingSteps=5)  # long enough to preempt mid-run
        job["spec"]["checkpoints"].update(everySteps=20)
        for key, value in spec.items():
            job["spec"][key] = {**job["spec"].get(key, {}), **value} if isinstance(value, dict) else value
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, job)
        return self

    def status(self) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, self.name).get("status") or {}

    def condition(self, ctype: str) -> dict | None:
        return next((c for c in self.status().get("conditions") or [] if c["type"] == ctype), None)

    def pods(self) -> list:
        return self.core.list_namespaced_pod(self.ns, label_selector=f"kubetune.io/job-name={self.name}").items

    def wait(self, pred, timeout: float, what: str):
        def check():
            st = self.status()
            if st.get("phase") == "Failed" and "Failed" not in what:
                raise AssertionError(f"job failed while waiting for {what}: {st.get('message')}\n{self.debug()}")
            return st if pred(st) else None

        try:
            return wait_for(check, timeout=timeout, interval=1, what=what)
        except AssertionError:
            print(self.debug())
            raise

    def debug(self) -> str:
        out = [f"status: {self.status()}"]
        for pod in self.pods():
            out.append(self.stack.kubectl("-n", self.ns, "logs", pod.metadata.name, "--tail=30", check=False).stdout)
        out.append(self.stack.operator_logs()[-3000:])
        return "\n".join(out)

    def objects(self, uri: str) -> list[str]:
        from kubetune_trainer import s3 as s3lib

        return [o.key for o in s3lib.list_objects(self.stack.minio.client(), uri)]


def checkpointed(min_step: int):
    return lambda st: (st.get("lastCheckpoint") or {}).get("step", 0) >= min_step and st.get("phase") == "Running"


def created_at(job: Job) -> float:
    obj = job.custom.get_namespaced_custom_object(GROUP, VERSION, job.ns, PLURAL, job.name)
    return calendar.timegm(time.strptime(obj["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ"))


def series(prom, metric: str, ns: str, name: str, **labels: str) -> str:
    sel = ",".join(f'{k}="{v}"' for k, v in {"job_namespace": ns, "finetunejob": name, **labels}.items())
    return f"{metric}{{{sel}}}"


def test_spot_eviction_resumes_from_the_checkpoint_and_succeeds(stack, ns):
    job = Job(stack, ns, "evicted").create()
    # A short job beside it, never evicted: no time lost to preemption (its own half core: both fit).
    clean = Job(stack, ns, "clean").create(training={"maxSteps": 40}, resources={"cpu": "500m"})
    job.wait(checkpointed(20), timeout=300, what="a first checkpoint")
    pod = job.status()["workers"][0]["name"]
    job.core.create_namespaced_pod_eviction(pod, ns, {"metadata": {"name": pod, "namespace": ns}})

    job.wait(lambda st: st.get("preemptions") == 1, timeout=120, what="the preemption counted")
    st = job.wait(lambda st: st.get("phase") == "Succeeded", timeout=600, what="Succeeded")
    assert st["preemptions"] == 1 and st["restarts"] == 0 and st["attempt"] == 1
    assert st["progress"]["resumedFromStep"] > 0, st["progress"]
    assert st["progress"]["step"] == 600
    keys = job.objects(st["outputUri"])
    assert any(k.endswith("model_card.json") for k in keys), keys
    assert any(k.endswith("adapter_model.safetensors") for k in keys), keys
    # The SIGTERM checkpoint is the one it resumed from: no step was trained twice.
    uid = job.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "evicted")["metadata"]["uid"]
    prefix = f"s3://kubetune-demo/checkpoints/{ns}/evicted/{uid}/checkpoints/"  # step-<n>-a<attempt>/
    steps = sorted(
        int(k.rsplit("step-", 1)[1].split("/")[0].split("-")[0])
        for k in job.objects(prefix)
        if k.endswith("MANIFEST.json")
    )
    assert steps, f"no committed checkpoint under {prefix}"
    assert st["progress"]["resumedFromStep"] in steps or st["progress"]["resumedFromStep"] <= max(steps)
    clean_st = clean.wait(lambda st: st.get("phase") == "Succeeded", timeout=300, what="the clean job Succeeded")
    assert clean_st["preemptions"] == 0
    dashboards_agree_with_status(stack, job, st, clean, clean_st)


def dashboards_agree_with_status(stack, job: Job, st: dict, clean: Job, clean_st: dict) -> None:
    """Every panel of the shipped dashboards over the job's lifetime, as Grafana would query it."""
    prom, ns = stack.prometheus, job.ns
    cost = st["cost"]
    usd = float(cost["estimatedUsd"])
    wait_for(  # the operator's final status scraped
        lambda: (
            (prom.value(series(prom, "kubetune_job_cost_usd_total", ns, "evicted")) or -1)
            == pytest.approx(usd, abs=1e-9)
        ),
        timeout=30,
        what="the final cost scraped",
    )
    time.sleep(2)  # the range queries' last step lands after the final scrape too
    start, end = created_at(job), time.time()
    results = panel_results(prom, {"job_namespace": ns, "finetunejob": "evicted"}, start, end, step=2)
    empty = {key for key, r in results.items() if not r}
    print(f"{len(results)} panel queries over {end - start:.0f}s; empty: {sorted(empty)}")
    # On CPU: the NVML/MFU, DCGM and OpenCost panels are empty (no error); every other one has data.
    assert empty == using(GPU_OR_EXTERNAL), "panels without data, or GPU/external panels with data"

    # Trainer panels: from both attempts' pods, with the PodMonitor's target labels.
    pods = prom.query_range(
        f"max by (worker_pod, worker_node) ({series(prom, 'kubetune_trainer_step', ns, 'evicted')})", start, end, 2
    )
    assert {s["metric"]["worker_pod"] for s in pods} == {"evicted-a0-w0", "evicted-a1-w0"}, pods
    assert all(s["metric"]["worker_node"] for s in pods)
    # scraped until near the last step (a 1 s scrape can time out on a busy 2-core host)
    assert max(float(v) for s in pods for _, v in s["values"]) >= 500

    def peak(board: str, title: str, ref: str = "A") -> float:
        return max(float(v) for s in results[board, title, ref] for _, v in s["values"])

    assert peak("utilization", "Throughput") > 0 and peak("utilization", "Step rate") > 0
    assert 0 < peak("utilization", "Loss") < 20  # B, the eval loss, has data (above); set when an eval ran
    assert peak("utilization", "Time blocked by checkpoint saves") > 0

    # Operator panels: the numbers of status.cost.
    assert last(results["cost", "Preemptions per job", "A"]) == 1 == st["preemptions"]
    assert last(results["cost", "Accrued cost per job", "A"]) == pytest.approx(usd, abs=1e-4) and usd > 0
    gpu_hours = float(cost.get("spotGpuHours") or 0) + float(cost.get("onDemandGpuHours") or 0)
    by_capacity = results["cost", "GPU-hours by capacity type", "A"]
    assert sum(float(s["value"][1]) for s in by_capacity) == pytest.approx(gpu_hours, abs=1e-5)
    assert last(results["utilization", "Progress", "A"]) == 1
    assert prom.value('max(up{job="kubetune-operator-metrics", namespace="kubetune-system"})') == 1
    assert not prom.query('ALERTS{alertname=~"KubetuneOperatorDown|KubetuneJobStalled"}')
    # The demo's closing summary reads the same series.
    print(demo_summary.summary(prom, ns, "evicted", st))
    figures = demo_summary.values(prom, ns, "evicted")
    assert figures["cost"] == pytest.approx(usd, abs=1e-9) and figures["preemptions"] == 1

    # ---- needs the goodput branch (status.cost.workerSeconds/cpuCoreHours/goodput and the operator's
    # kubetune_job_worker_seconds_total, _cpu_core_seconds_total, _goodput_seconds_total): fails before it.
    def metric(name: str, job_name: str = "evicted", **labels: str) -> float | None:
        return prom.value(f"max({series(prom, name, ns, job_name, **labels)})")

    assert metric("kubetune_job_cpu_core_seconds_total") == pytest.approx(float(cost["cpuCoreHours"]) * 3600, abs=1)
    assert metric("kubetune_job_worker_seconds_total") == pytest.approx(float(cost["workerSeconds"]), abs=1)
    lost = float(cost["goodput"]["lostToPreemptionSeconds"])
    assert lost > 0 and float(cost["goodput"]["lostToPreemptionUsd"]) > 0
    lost_metric = metric("kubetune_job_goodput_seconds_total", category="lost_to_preemption")
    assert lost_metric == pytest.approx(lost, abs=1)
    assert clean_st["cost"]["goodput"]["lostToPreemptionSeconds"] == 0
    assert metric("kubetune_job_goodput_seconds_total", "clean", category="lost_to_preemption") == 0


def test_replaced_node_is_a_preemption_and_the_job_resumes(stack, ns):
    if stack.node is None:
        pytest.skip("needs the local node (replacing a kind node is left to kind's own tooling)")
    job = Job(stack, ns, "nodegone").create()
    job.wait(checkpointed(20), timeout=300, what="a first checkpoint")
    node = job.status()["workers"][0]["node"]
    stack.replace_node()  # the VM is gone at once (no SIGTERM) and a new one joins
    job.core.delete_node(node)
    job.wait(lambda st: st.get("preemptions") == 1, timeout=180, what="the preemption counted")
    st = job.wait(lambda st: st.get("phase") == "Succeeded", timeout=600, what="Succeeded")
    assert st["progress"]["resumedFromStep"] >= 20 and st["restarts"] == 0
    assert st["workers"][0]["node"] != node


def test_invalid_data_fails_with_the_reason_and_no_retry(stack, ns):
    from kubetune_trainer import s3 as s3lib

    bad = b'{"prompt": "count from one", "response": "two three"}\n{not json\n{"prompt": "x"}\n' * 20
    s3lib.put_bytes(stack.minio.client(), "s3://kubetune-demo/datasets/bad.jsonl", bad)
    job = Job(stack, ns, "baddata").create(dataset={"uri": "s3://kubetune-demo/datasets/bad.jsonl"})
    st = job.wait(lambda st: st.get("phase") == "Failed", timeout=300, what="Failed")
    failed = job.condition("Failed")
    assert failed["reason"] == "TrainerUserError"
    assert "bad.jsonl:2: bad JSON" in failed["message"], failed["message"]
    assert "bad.jsonl:3: missing field 'response'" in failed["message"], failed["message"]
    assert st["restarts"] == 0 and [p.metadata.name for p in job.pods()] == ["baddata-a0-w0"]


def test_deleting_a_running_job_removes_its_pods_and_keeps_its_checkpoints(stack, ns):
    job = Job(stack, ns, "deleted").create()
    job.wait(checkpointed(20), timeout=300, what="a first checkpoint")
    job.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "deleted")
    wait_for(lambda: not job.pods(), timeout=120, what="pods removed")
    keys = job.objects(f"s3://kubetune-demo/checkpoints/{ns}/deleted/")
    assert any(k.endswith("MANIFEST.json") for k in keys), keys
