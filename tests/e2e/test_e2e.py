"""End to end on a real node: the CPU trainer image runs in pods on a real kubelet + containerd,
checkpoints to MinIO, is preempted (Eviction API; a Node replaced), resumes, and finishes. The
operator runs in-cluster from the Helm chart, under its own ServiceAccount.

They boot their own stack (kubetune_dev.stack). hack/kind-e2e.sh runs the same module against
a kind cluster by setting KUBETUNE_E2E_KUBECONFIG.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import kubernetes
import pytest
import yaml

from kubetune_dev.controlplane import create_namespace
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


def test_spot_eviction_resumes_from_the_checkpoint_and_succeeds(stack, ns):
    job = Job(stack, ns, "evicted").create()
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
    prefix = f"s3://kubetune-demo/checkpoints/{ns}/evicted/checkpoints/"
    steps = sorted(
        int(k.rsplit("step-", 1)[1].split("/")[0]) for k in job.objects(prefix) if k.endswith("MANIFEST.json")
    )
    assert st["progress"]["resumedFromStep"] in steps or st["progress"]["resumedFromStep"] <= max(steps)


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
