"""The real operator against a real API server, scheduler and controllers; kwok plays the
kubelets of fake (spot, GPU) nodes, and the tests play the trainer's exits where they must."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time

import pytest
from kubernetes.client.rest import ApiException

from kubetune_contract.config import TrainerConfig
from kubetune_contract.progress import ExitCode, ProgressRecord
from kubetune_dev.jobs import job_manifest
from tests.fixtures.control_plane import wait_for

from .jobs import Jobs

pytestmark = pytest.mark.cluster
NO_SIZING = {"estimate": False}  # GPU jobs whose sizing is not the point (tests/cluster/test_sizing.py)


@pytest.fixture(scope="module")
def s3_port():
    """Something listening where spec.s3.endpoint points: the operator's preflight is a TCP connect."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


@pytest.fixture
def jobs(kube_api, namespace, operator) -> Jobs:
    j = Jobs(kube_api, namespace)
    j.secret()
    return j


@pytest.fixture
def spec(s3_port):
    """Spec overrides that point S3 at the listener."""
    return {"s3": {"endpoint": f"http://127.0.0.1:{s3_port}"}}


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def finish_pod(
    jobs: Jobs,
    pod: str,
    exit_code: int,
    record: ProgressRecord | None = None,
    reason: str | None = None,
    started_at: str | None = None,
) -> None:
    """What the kubelet reports when the trainer container exits (started now unless started_at says)."""
    term = {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "startedAt": started_at or now(),
        "finishedAt": now(),
    }
    if record is not None:
        term["message"] = record.model_dump_json(by_alias=True, exclude_none=True)
    jobs.core.patch_namespaced_pod_status(
        pod,
        jobs.ns,
        {
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "ready": False,
                        "restartCount": 0,
                        "image": "trainer",
                        "imageID": "",
                        "state": {"terminated": term},
                    }
                ],
            }
        },
    )


def pod_names(jobs: Jobs, name: str) -> list[str]:
    return sorted(p.metadata.name for p in jobs.pods(name))


def phase(jobs: Jobs, name: str) -> str | None:
    return jobs.status(name).get("phase")


def running_pod(jobs: Jobs, name: str, attempt: int = 0, rank: int = 0):
    pod_name = f"{name}-a{attempt}-w{rank}"

    def is_running():
        pod = next((p for p in jobs.pods(name) if p.metadata.name == pod_name), None)
        return (
            pod if pod is not None and pod.status.phase == "Running" and not pod.metadata.deletion_timestamp else None
        )

    return wait_for(is_running, timeout=30, what=f"{pod_name} Running")


def evict(jobs: Jobs, pod: str) -> None:
    jobs.core.create_namespaced_pod_eviction(pod, jobs.ns, {"metadata": {"name": pod, "namespace": jobs.ns}})


# ---- the happy path ------------------------------------------------------------------------


def test_job_gets_an_owned_trainer_pod_and_config(jobs, spec, fake_nodes):
    node = fake_nodes(spot=True)
    job = jobs.create(job_manifest(name="happy", **spec))
    pod = running_pod(jobs, "happy")

    owner = pod.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (
        "FineTuneJob",
        "happy",
        job["metadata"]["uid"],
        True,
    )
    assert pod.spec.node_name == node and pod.spec.restart_policy == "Never"
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["KUBETUNE_ATTEMPT"] == "0"
    secret_env = {
        e.name: e.value_from.secret_key_ref.name
        for e in pod.spec.containers[0].env
        if e.value_from and e.value_from.secret_key_ref
    }
    assert secret_env == {"AWS_ACCESS_KEY_ID": "s3-creds", "AWS_SECRET_ACCESS_KEY": "s3-creds"}
    assert pod.spec.termination_grace_period_seconds == 30

    cm = jobs.core.read_namespaced_config_map("happy-trainer-config", jobs.ns)
    config = TrainerConfig.loads(cm.data["trainer-config.json"])
    assert config.job.uid == job["metadata"]["uid"]
    uid = job["metadata"]["uid"]  # the incarnation: its checkpoints and output live under its UID
    assert config.checkpoint_prefix == f"s3://kubetune-demo/checkpoints/{jobs.ns}/happy/{uid}"
    pod_uid = [e for e in pod.spec.containers[0].env if e.name == "KUBETUNE_POD_UID"]
    assert pod_uid and pod_uid[0].value_from.field_ref.field_path == "metadata.uid"
    assert config.training.max_steps == 300 and config.method == "lora"

    wait_for(lambda: phase(jobs, "happy") == "Running", what="job Running")
    st = jobs.status("happy")
    assert st["workers"] == [
        {"name": "happy-a0-w0", "rank": 0, "phase": "Running", "node": node, "attempt": 0, "capacityType": "spot"}
    ]
    assert st["startTime"] and st["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in st["conditions"]}.items() >= {
        "Created": "True",
        "Running": "True",
        "Ready": "True",
    }.items()
    reasons = {e.reason for e in jobs.events("happy")}
    assert {"PodsCreated", "Running"} <= reasons

    record = ProgressRecord(
        phase="done", step=120, total_steps=120, loss=1.25, output_uri="s3://kubetune-demo/outputs/x/happy"
    )
    finish_pod(jobs, "happy-a0-w0", 0, record)
    wait_for(lambda: phase(jobs, "happy") == "Succeeded", what="job Succeeded")
    st = jobs.status("happy")
    assert st["progress"]["progressPercentage"] == 100 and st["progress"]["loss"] == 1.25
    assert st["outputUri"] == "s3://kubetune-demo/outputs/x/happy" and st["completionTime"]
    assert float(st["cost"]["estimatedUsd"]) >= 0 and st["preemptions"] == 0
    # Finished: nothing is recreated.
    time.sleep(3)
    assert pod_names(jobs, "happy") == ["happy-a0-w0"]


# ---- preemption ----------------------------------------------------------------------------


def test_eviction_is_a_preemption_and_a_new_pod_resumes(jobs, spec, fake_nodes):
    fake_nodes(spot=True)
    jobs.create(job_manifest(name="evicted", **spec))
    running_pod(jobs, "evicted")
    evict(jobs, "evicted-a0-w0")  # a spot reclaim as a node drainer does it

    wait_for(lambda: jobs.status("evicted").get("preemptions") == 1, what="preemption counted")
    pod = running_pod(jobs, "evicted", attempt=1)
    assert pod.metadata.labels["kubetune.io/attempt"] == "1"
    st = jobs.status("evicted")
    assert st["restarts"] == 0 and st["attempt"] == 1
    preempted = jobs.condition("evicted", "Preempted")
    assert preempted and "evicted-a0-w0 preempted" in preempted["message"]
    assert "Preempted" in {e.reason for e in jobs.events("evicted")}
    wait_for(lambda: "evicted-a0-w0" not in pod_names(jobs, "evicted"), what="old pod gone")

    finish_pod(jobs, "evicted-a1-w0", 0, ProgressRecord(phase="done", step=120, total_steps=120, resumed_from_step=60))
    wait_for(lambda: phase(jobs, "evicted") == "Succeeded", what="Succeeded after a preemption")
    assert jobs.status("evicted")["progress"]["resumedFromStep"] == 60


def test_trainer_preempted_exit_code_is_a_preemption(jobs, spec, fake_nodes):
    fake_nodes(spot=True)
    jobs.create(job_manifest(name="sigterm", **spec))
    running_pod(jobs, "sigterm")
    finish_pod(jobs, "sigterm-a0-w0", ExitCode.PREEMPTED, ProgressRecord(phase="done", step=40, total_steps=120))
    running_pod(jobs, "sigterm", attempt=1)
    st = jobs.status("sigterm")
    assert st["preemptions"] == 1 and st["restarts"] == 0


def test_deleting_the_node_is_a_preemption(jobs, spec, fake_nodes):
    node = fake_nodes(spot=True)
    jobs.create(job_manifest(name="nodegone", **spec))
    running_pod(jobs, "nodegone")
    fake_nodes(spot=True)  # somewhere to go
    jobs.core.delete_node(node)  # the cloud took the VM back
    # The pod garbage collector removes pods bound to a vanished node (after its quarantine).
    wait_for(
        lambda: jobs.status("nodegone").get("preemptions") == 1,
        timeout=150,
        interval=1,
        what="preemption after node deletion",
    )
    new = running_pod(jobs, "nodegone", attempt=1)
    assert new.spec.node_name != node


def test_too_many_preemptions_fall_back_to_on_demand(jobs, spec, fake_nodes):
    fake_nodes(spot=True)
    on_demand = fake_nodes(spot=False)
    jobs.create(
        job_manifest(
            name="fallback", capacity={"policy": "spot", "maxPreemptions": 0, "fallbackToOnDemand": True}, **spec
        )
    )
    first = running_pod(jobs, "fallback")
    assert first.spec.node_name != on_demand  # spot only
    evict(jobs, "fallback-a0-w0")
    pod = running_pod(jobs, "fallback", attempt=1)
    assert pod.spec.node_name == on_demand
    st = jobs.status("fallback")
    assert st["onDemandFallback"] is True and st["preemptions"] == 1
    assert "FallbackToOnDemand" in {e.reason for e in jobs.events("fallback")}


def test_too_many_preemptions_fail_without_fallback(jobs, spec, fake_nodes):
    fake_nodes(spot=True)
    jobs.create(job_manifest(name="toomany", capacity={"maxPreemptions": 0}, **spec))
    running_pod(jobs, "toomany")
    evict(jobs, "toomany-a0-w0")
    wait_for(lambda: phase(jobs, "toomany") == "Failed", what="Failed")
    assert jobs.condition("toomany", "Failed")["reason"] == "TooManyPreemptions"
    time.sleep(2)
    assert "toomany-a1-w0" not in pod_names(jobs, "toomany")


# ---- failures -----------------------------------------------------------------------------


def test_user_error_fails_the_job_without_retry(jobs, spec, fake_nodes):
    fake_nodes()
    jobs.create(job_manifest(name="baddata", **spec))
    running_pod(jobs, "baddata")
    why = (
        "dataset s3://kubetune-demo/datasets/instructions.jsonl line 3: invalid JSON; "
        "40% bad records > maxBadRecordFraction 0"
    )
    finish_pod(jobs, "baddata-a0-w0", ExitCode.USER_ERROR, ProgressRecord(phase="failed", message=why))
    wait_for(lambda: phase(jobs, "baddata") == "Failed", what="Failed")
    failed = jobs.condition("baddata", "Failed")
    assert failed["reason"] == "TrainerUserError" and failed["message"] == why
    assert jobs.status("baddata")["restarts"] == 0
    time.sleep(2)
    assert pod_names(jobs, "baddata") == ["baddata-a0-w0"]


def test_infrastructure_failures_retry_up_to_the_backoff_limit(jobs, spec, fake_nodes):
    fake_nodes()
    jobs.create(job_manifest(name="flaky", runPolicy={"backoffLimit": 1}, **spec))
    running_pod(jobs, "flaky")
    finish_pod(jobs, "flaky-a0-w0", 137, reason="OOMKilled")
    running_pod(jobs, "flaky", attempt=1)
    assert jobs.status("flaky")["restarts"] == 1
    finish_pod(jobs, "flaky-a1-w0", ExitCode.RETRIABLE)
    wait_for(lambda: phase(jobs, "flaky") == "Failed", what="Failed")
    failed = jobs.condition("flaky", "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "backoffLimit=1" in failed["message"]


# ---- bad input that passes the schema -----------------------------------------------------


# A missing Secret or key: tests/cluster/test_security.py (the kubelet reports it; the operator reads no Secret).


def test_unreachable_s3_endpoint_waits_with_a_reason(jobs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    jobs.create(job_manifest(name="nos3", s3={"endpoint": f"http://127.0.0.1:{closed}"}))
    wait_for(
        lambda: (jobs.condition("nos3", "Ready") or {}).get("reason") == "S3EndpointUnreachable",
        what="S3EndpointUnreachable",
    )
    assert f"127.0.0.1:{closed}" in jobs.condition("nos3", "Ready")["message"]
    assert pod_names(jobs, "nos3") == []


def test_unknown_gpu_type_is_named(jobs, spec, fake_nodes):
    fake_nodes(gpus=8, gpu_type="NVIDIA-A100-SXM4-80GB")
    jobs.create(
        job_manifest(name="gpuz", resources={"gpus": 1, "gpuType": "NVIDIA-Z9000"}, preflight=NO_SIZING, **spec)
    )
    wait_for(
        lambda: (jobs.condition("gpuz", "Scheduled") or {}).get("reason") == "UnknownGPUType", what="UnknownGPUType"
    )
    assert "NVIDIA-Z9000" in jobs.condition("gpuz", "Scheduled")["message"]
    assert phase(jobs, "gpuz") == "Pending"


def test_gpu_job_lands_on_a_matching_gpu_node(jobs, spec, fake_nodes):
    fake_nodes(spot=True, gpus=8, gpu_type="NVIDIA-L4")
    node = fake_nodes(spot=True, gpus=8, gpu_type="NVIDIA-A100-SXM4-80GB")
    jobs.create(
        job_manifest(name="gpu", resources={"gpus": 2, "gpuType": "NVIDIA-A100-SXM4-80GB"}, preflight=NO_SIZING, **spec)
    )
    pod = running_pod(jobs, "gpu")
    assert pod.spec.node_name == node
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "2"


def test_rejected_pod_fails_the_job_with_the_api_message(jobs, spec):
    jobs.create(job_manifest(name="badenv", pod={"env": [{"value": "no name"}]}, **spec))
    wait_for(lambda: phase(jobs, "badenv") == "Failed", what="Failed")
    failed = jobs.condition("badenv", "Failed")
    assert failed["reason"] == "PodRejected" and "env[" in failed["message"] and "name" in failed["message"]


# ---- lifecycle ----------------------------------------------------------------------------


def test_multi_worker_ranks_find_rank_zero(jobs, spec, fake_nodes):
    fake_nodes()
    jobs.create(job_manifest(name="ddp", resources={"workers": 3}, **spec))
    rank0 = running_pod(jobs, "ddp", rank=0)
    for rank in (1, 2):
        pod = running_pod(jobs, "ddp", rank=rank)
        env = {e.name: e.value for e in pod.spec.containers[0].env}
        assert env["MASTER_ADDR"] == rank0.status.pod_ip and env["RANK"] == str(rank) and env["WORLD_SIZE"] == "3"
    wait_for(lambda: phase(jobs, "ddp") == "Running", what="Running")
    # One worker dies of an infrastructure failure: the whole attempt is replaced.
    finish_pod(jobs, "ddp-a0-w1", ExitCode.RETRIABLE)
    for rank in (0, 1, 2):
        running_pod(jobs, "ddp", attempt=1, rank=rank)
    assert jobs.status("ddp")["restarts"] == 1


def test_suspend_stops_pods_and_resume_starts_a_new_attempt(jobs, spec, fake_nodes):
    fake_nodes()
    jobs.create(job_manifest(name="pause", **spec))
    running_pod(jobs, "pause")
    jobs.patch_spec("pause", {"runPolicy": {"suspend": True}})
    wait_for(lambda: phase(jobs, "pause") == "Suspended", what="Suspended")
    wait_for(lambda: pod_names(jobs, "pause") == [], what="pods deleted")
    jobs.patch_spec("pause", {"runPolicy": {"suspend": False}})
    running_pod(jobs, "pause", attempt=1)
    st = jobs.status("pause")
    assert st["preemptions"] == 0 and st["restarts"] == 0


def test_active_deadline_fails_the_job(jobs, spec, fake_nodes):
    fake_nodes()
    jobs.create(job_manifest(name="slow", runPolicy={"activeDeadlineSeconds": 3}, **spec))
    running_pod(jobs, "slow")
    wait_for(lambda: phase(jobs, "slow") == "Failed", timeout=20, what="Failed by deadline")
    assert jobs.condition("slow", "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: pod_names(jobs, "slow") == [], what="pods stopped")


def test_finished_job_is_deleted_after_its_ttl(jobs, spec, fake_nodes):
    fake_nodes()
    jobs.create(job_manifest(name="ttl", runPolicy={"ttlSecondsAfterFinished": 1}, **spec))
    running_pod(jobs, "ttl")
    finish_pod(jobs, "ttl-a0-w0", 0, ProgressRecord(phase="done", step=120, total_steps=120))

    def gone():
        try:
            jobs.get("ttl")
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(gone, timeout=20, what="job deleted after TTL")


def test_deleting_a_job_removes_its_pods_and_config(jobs, spec, fake_nodes):
    fake_nodes()
    jobs.create(job_manifest(name="bye", **spec))
    running_pod(jobs, "bye")
    jobs.delete("bye")
    wait_for(lambda: pod_names(jobs, "bye") == [], what="pods garbage-collected")

    def cm_gone():
        try:
            jobs.core.read_namespaced_config_map("bye-trainer-config", jobs.ns)
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(cm_gone, what="ConfigMap garbage-collected")
