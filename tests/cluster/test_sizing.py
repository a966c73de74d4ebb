"""Right-sizing on a real API server: a GPU job gets a CPU-only sizing pod before any GPU pod; the
test plays its kubelet (the sizing pod's termination message is the SizingRecord the trainer's
`size` entry point writes), and the operator's status.estimate, refusal and recovery follow."""

from __future__ import annotations

import time

import pytest

from kubetune_contract.progress import ExitCode
from kubetune_contract.sizing import SizingRecord
from kubetune_dev.jobs import job_manifest
from kubetune_dev.model_shapes import LLAMA3_8B as LLAMA_8B
from kubetune_dev.model_shapes import LLAMA3_70B as LLAMA_70B
from tests.fixtures.control_plane import wait_for

from .test_operator import finish_pod, jobs, phase, pod_names, running_pod, s3_port, spec  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cluster
A100 = "NVIDIA-A100-SXM4-80GB"
GPU = {"resources": {"gpus": 1, "gpuType": A100}, "training": {"precision": "bf16", "gradientCheckpointing": "always"}}


def gpu_job(name: str, spec: dict) -> dict:
    return job_manifest(name=name, **GPU, **spec)


def sizing_pod(jobs, name: str, generation: int = 1):
    pod_name = f"{name}-size-g{generation}"
    return wait_for(
        lambda: next((p for p in jobs.pods(name) if p.metadata.name == pod_name), None), what=f"sizing pod {pod_name}"
    )


def reason(jobs, name: str) -> str | None:
    return (jobs.condition(name, "Ready") or {}).get("reason")


def test_a_job_that_fits_is_sized_on_cpu_then_gets_its_gpu_pod(jobs, spec, fake_nodes):
    fake_nodes(spot=True, gpus=8, gpu_type=A100)
    jobs.create(gpu_job("fits", spec))
    pod = sizing_pod(jobs, "fits")
    c = pod.spec.containers[0]
    assert c.args == ["size"] and "nvidia.com/gpu" not in (c.resources.limits or {})
    assert pod.metadata.owner_references[0].name == "fits" and pod.spec.restart_policy == "Never"
    assert {e.name for e in c.env if e.value_from and e.value_from.secret_key_ref} == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }  # the job's own credentials, not the operator's
    wait_for(lambda: reason(jobs, "fits") == "Sizing", what="Ready=False Sizing")
    time.sleep(1)
    assert pod_names(jobs, "fits") == ["fits-size-g1"]  # no GPU pod while sizing

    finish_pod(jobs, "fits-size-g1", 0, SizingRecord(phase="done", model_facts=LLAMA_8B))  # type: ignore[arg-type]
    worker = running_pod(jobs, "fits")
    assert worker.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    est = jobs.status("fits")["estimate"]
    assert est["result"] == "Fits" and est["fits"] is True and 16 < est["gpuMemoryGiB"] < 80
    assert float(est["estimatedUsd"]["low"]) < float(est["estimatedUsd"]["high"])
    assert est["estimatedGpuHours"]["low"] > 0 and est["usdPerGpuHour"] == [1.6, 4.1]
    wait_for(lambda: "fits-size-g1" not in pod_names(jobs, "fits"), what="sizing pod deleted")
    assert "Estimated" in {e.reason for e in jobs.events("fits")}


def test_a_job_that_cannot_fit_is_held_with_advice_until_the_spec_fits(jobs, spec, fake_nodes):
    fake_nodes(spot=True, gpus=8, gpu_type=A100)
    jobs.create(gpu_job("huge", spec))
    sizing_pod(jobs, "huge")
    finish_pod(jobs, "huge-size-g1", 0, SizingRecord(phase="done", model_facts=LLAMA_70B))  # type: ignore[arg-type]
    wait_for(lambda: reason(jobs, "huge") == "WontFit", what="Ready=False WontFit")
    st = jobs.status("huge")
    assert st["phase"] == "Pending" and st["estimate"]["fits"] is False and st["estimate"]["gpuMemoryGiB"] > 80
    ready = jobs.condition("huge", "Ready")
    assert 'method="qlora"' in ready["message"] and "spec.preflight.estimate: false" in ready["message"]
    warnings = [e for e in jobs.events("huge") if e.reason == "WontFit"]
    assert [e.type for e in warnings] == ["Warning"]
    wait_for(lambda: pod_names(jobs, "huge") == [], what="sizing pod deleted")
    time.sleep(3)  # sweeps pass: still held, no GPU pod, no second warning
    assert pod_names(jobs, "huge") == [] and len([e for e in jobs.events("huge") if e.reason == "WontFit"]) == 1

    jobs.patch_spec("huge", {"method": "qlora"})  # the advice: re-estimated at once, no new sizing pod
    worker = running_pod(jobs, "huge")
    assert worker.metadata.name == "huge-a0-w0"
    st = jobs.status("huge")
    assert st["estimate"]["result"] == "Fits" and st["estimate"]["observedGeneration"] == 2
    assert reason(jobs, "huge") == "PreflightPassed" and "huge-size-g2" not in pod_names(jobs, "huge")


def test_a_sizing_pod_that_fails_gives_a_condition_and_no_gpu_pod(jobs, spec, fake_nodes):
    fake_nodes(spot=True, gpus=8, gpu_type=A100)
    jobs.create(gpu_job("nomodel", spec))
    sizing_pod(jobs, "nomodel")
    why = "baseModel.uri: s3://kubetune-demo/models/tiny-llama/config.json does not exist at http://127.0.0.1:9"
    finish_pod(jobs, "nomodel-size-g1", ExitCode.USER_ERROR, SizingRecord(phase="failed", message=why))  # type: ignore[arg-type]
    wait_for(lambda: reason(jobs, "nomodel") == "SizingFailed", what="Ready=False SizingFailed")
    assert why in jobs.condition("nomodel", "Ready")["message"]
    assert jobs.status("nomodel")["estimate"]["result"] == "Failed"
    wait_for(lambda: pod_names(jobs, "nomodel") == [], what="sizing pod deleted")
    # Skipping the estimate is a spec edit too: the job proceeds.
    jobs.patch_spec("nomodel", {"preflight": {"estimate": False}})
    running_pod(jobs, "nomodel")


def test_cpu_jobs_have_no_sizing_pod(jobs, spec, fake_nodes):
    fake_nodes()
    jobs.create(job_manifest(name="cpu", **spec))
    running_pod(jobs, "cpu")
    assert pod_names(jobs, "cpu") == ["cpu-a0-w0"] and "estimate" not in jobs.status("cpu")
