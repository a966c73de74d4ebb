"""Sizing before any GPU is requested, as a pure decision: the sizing pod, status.estimate, and
the refusal with advice of a job that cannot fit."""

from __future__ import annotations

import datetime as dt

from kubetune_contract.progress import ExitCode, ProgressRecord
from kubetune_contract.sizing import DatasetFacts, SizingRecord
from kubetune_dev.model_shapes import LLAMA3_8B as LLAMA_8B
from kubetune_dev.model_shapes import LLAMA3_70B as LLAMA_70B
from kubetune_operator.decide import decide
from kubetune_operator.decide_sizing import SIZING_TIMEOUT_SECONDS
from kubetune_operator.views import PodView

from .test_decide import T0, after, job, observe

L4 = {"gpus": 1, "gpuType": "NVIDIA-L4"}
A100 = {"gpus": 1, "gpuType": "NVIDIA-A100-SXM4-80GB"}
PRICES = (1.60, 4.10)


def sizing_pod(phase="Running", gen=1, record=None, exit_code=None, created=T0, message=None, **kw) -> PodView:
    if record is not None:
        message = record.model_dump_json(by_alias=True, exclude_none=True)
    return PodView(
        name=f"j-size-g{gen}",
        attempt=0,
        rank=0,
        phase=phase,
        role="sizing",
        message=message,
        exit_code=exit_code if exit_code is not None else (0 if phase == "Succeeded" else None),
        created_at=created,
        **kw,
    )


def done(facts=LLAMA_8B, dataset=None) -> SizingRecord:
    return SizingRecord(phase="done", model_facts=facts, dataset=dataset, seconds=3.0)


def gpu_job(status=None, generation=1, **spec):
    training = {"precision": "bf16", "gradientCheckpointing": True, **spec.pop("training", {})}
    return job(status=status, generation=generation, **{"resources": A100, "training": training, **spec})


def sized(j, pod, **kw):
    return decide(observe(j, sizing_pods=(pod,), gpu_hour_prices=PRICES, **kw))


def ready(d):
    return next(c for c in d.status["conditions"] if c["type"] == "Ready")


def test_a_gpu_job_is_sized_in_a_cpu_pod_before_any_gpu_pod():
    d = decide(observe(gpu_job(), gpu_hour_prices=PRICES))
    assert d.create_sizing_pod == "j-size-g1" and d.ensure_config  # the sizing pod reads the trainer config
    assert d.create_pods == [] and d.status["phase"] == "Pending"
    assert (ready(d)["status"], ready(d)["reason"]) == ("False", "Sizing")
    assert "j-size-g1" in ready(d)["message"] and [e.reason for e in d.events] == ["Sizing"]
    # Seen running: no second pod, still waiting, kept.
    d2 = sized(after(d, gpu_job()), sizing_pod())
    assert d2.create_sizing_pod is None and d2.create_pods == [] and d2.delete_pods == []
    assert ready(d2)["reason"] == "Sizing" and d2.events == []


def test_cpu_jobs_and_the_spec_knob_skip_sizing():
    assert decide(observe(job())).create_pods == [(0, 0)]
    d = decide(observe(gpu_job(preflight={"estimate": False})))
    assert d.create_pods == [(0, 0)] and d.create_sizing_pod is None and "estimate" not in d.status


def test_a_job_that_fits_gets_its_estimate_and_its_pods_and_the_sizing_pod_is_deleted():
    j = gpu_job(status={"phase": "Pending"})
    d = sized(j, sizing_pod("Succeeded", record=done()))
    est = d.status["estimate"]
    assert est["result"] == "Fits" and est["fits"] is True and est["gpuType"] == "NVIDIA-A100-SXM4-80GB"
    assert 16 < est["gpuMemoryGiB"] < 80 and est["gpuCapacityGiB"] == 80.0
    assert est["tokensToTrain"] == 300 * 8 * 128  # maxSteps x batch x seq (the example job)
    hours, usd = est["estimatedGpuHours"], est["estimatedUsd"]
    assert 0 < hours["low"] < hours["high"] and float(usd["low"]) < float(usd["high"])
    assert est["usdPerGpuHour"] == list(PRICES) and est["modelFacts"] == LLAMA_8B
    assert d.create_pods == [(0, 0)] and d.delete_pods == ["j-size-g1"]
    assert ready(d)["status"] == "True" and "Estimated" in [e.reason for e in d.events]
    # The next attempt (after a preemption) does not size again: the estimate stands for this spec.
    d2 = decide(observe(after(d, j), gpu_hour_prices=PRICES))
    assert d2.create_sizing_pod is None and d2.create_pods == [(0, 0)]


def test_a_job_that_cannot_fit_is_held_with_advice_and_the_fixed_spec_proceeds_without_a_new_pod():
    j = gpu_job(status={"phase": "Pending"})
    d = sized(j, sizing_pod("Succeeded", record=done(LLAMA_70B)))
    est = d.status["estimate"]
    assert est["result"] == "WontFit" and est["fits"] is False and est["gpuMemoryGiB"] > 80
    assert d.create_pods == [] and d.delete_pods == ["j-size-g1"] and d.status["phase"] == "Pending"
    r = ready(d)
    assert (r["status"], r["reason"]) == ("False", "WontFit")
    assert "does not fit" in r["message"] and "NVIDIA-A100-SXM4-80GB has 80 GiB" in r["message"]
    assert 'method="qlora"' in r["message"] and "spec.preflight.estimate: false" in r["message"]
    assert [e.type for e in d.events if e.reason == "WontFit"] == ["Warning"]
    # Seen again (the sweep): still held, no second event, no sizing pod.
    d2 = decide(observe(after(d, j), gpu_hour_prices=PRICES))
    assert d2.create_pods == [] and d2.create_sizing_pod is None and d2.events == []
    # The user takes the advice: re-estimated from the stored facts at once, and it starts.
    fixed = gpu_job(status=d2.status, generation=2, method="qlora")
    d3 = decide(observe(fixed, gpu_hour_prices=PRICES))
    assert d3.create_sizing_pod is None and d3.status["estimate"]["result"] == "Fits"
    assert d3.status["estimate"]["observedGeneration"] == 2 and d3.create_pods == [(0, 0)]
    assert ready(d3)["status"] == "True"


def test_a_changed_base_model_runs_a_new_sizing_pod():
    d = sized(gpu_job(status={"phase": "Pending"}), sizing_pod("Succeeded", record=done()))
    other = gpu_job(status=d.status, generation=2, baseModel={"uri": "s3://b/models/other"})
    d2 = decide(observe(other, gpu_hour_prices=PRICES))
    assert d2.create_sizing_pod == "j-size-g2" and d2.create_pods == []


def test_a_sizing_user_error_holds_the_job_until_the_spec_changes():
    why = "baseModel.uri: s3://kubetune-demo/models/nope/config.json does not exist at http://s3"
    pod = sizing_pod("Failed", record=SizingRecord(phase="failed", message=why), exit_code=ExitCode.USER_ERROR)
    j = gpu_job(status={"phase": "Pending"})
    d = sized(j, pod)
    assert d.status["estimate"]["result"] == "Failed" and why in d.status["estimate"]["error"]
    r = ready(d)
    assert (r["status"], r["reason"]) == ("False", "SizingFailed") and why in r["message"]
    assert d.create_pods == [] and d.delete_pods == ["j-size-g1"]
    assert [e.reason for e in d.events] == ["SizingFailed"]
    d2 = decide(observe(after(d, j), gpu_hour_prices=PRICES))
    assert d2.create_sizing_pod is None and d2.create_pods == [] and d2.events == []
    # Any edit (a new generation) sizes again, in a pod of its own name.
    d3 = decide(observe(gpu_job(status=d2.status, generation=2), gpu_hour_prices=PRICES))
    assert d3.create_sizing_pod == "j-size-g2"


def test_a_crashed_sizing_pod_or_a_config_error_record_proceeds_without_an_estimate():
    crashed = sizing_pod("Failed", exit_code=137, reason="OOMKilled")
    d = sized(gpu_job(status={"phase": "Pending"}), crashed)
    assert d.status["estimate"]["result"] == "Unavailable" and "OOMKilled" in d.status["estimate"]["error"]
    assert d.create_pods == [(0, 0)] and "SizingUnavailable" in [e.reason for e in d.events]
    # An old trainer image without `size` ends with a ProgressRecord: its words are the error.
    words = ProgressRecord(phase="failed", message="no such command").model_dump_json()
    old = sizing_pod("Failed", exit_code=1, message=words)
    d2 = sized(gpu_job(status={"phase": "Pending"}), old)
    assert "no such command" in d2.status["estimate"]["error"] and d2.create_pods == [(0, 0)]


def test_a_sizing_pod_that_never_finishes_is_bounded():
    stuck = sizing_pod("Pending", unschedulable="0/3 nodes are available: Insufficient cpu")
    j = gpu_job(status={"phase": "Pending"})
    d = sized(j, stuck, now=T0 + dt.timedelta(seconds=30))
    assert d.create_pods == [] and "Insufficient cpu" in ready(d)["message"]
    late = sized(j, stuck, now=T0 + dt.timedelta(seconds=SIZING_TIMEOUT_SECONDS + 1))
    assert late.status["estimate"]["result"] == "Unavailable" and "did not finish" in late.status["estimate"]["error"]
    assert late.create_pods == [(0, 0)] and late.delete_pods == ["j-size-g1"]


def test_an_unknown_gpu_type_proceeds_with_fits_unknown_and_a_note():
    j = gpu_job(status={"phase": "Pending"}, resources={"gpus": 1, "gpuType": "NVIDIA-Z9000"})
    d = sized(j, sizing_pod("Succeeded", record=done()))
    est = d.status["estimate"]
    assert est["result"] == "FitUnknown" and est["fits"] is None and d.create_pods == [(0, 0)]
    assert any("NVIDIA-Z9000" in n for n in est["notes"])


def test_an_unsupported_architecture_proceeds_with_the_reason():
    moe = {**LLAMA_8B, "num_local_experts": 8}
    d = sized(gpu_job(status={"phase": "Pending"}), sizing_pod("Succeeded", record=done(moe)))
    est = d.status["estimate"]
    assert est["result"] == "FitUnknown" and "mixture-of-experts" in est["notes"][0] and d.create_pods == [(0, 0)]


def test_an_epochs_job_is_estimated_from_the_dataset_facts():
    dataset = DatasetFacts(
        records=100_000, sampled_records=20_000, sequences=40_000, tokens=4_500_000, counted="sample"
    )
    j = gpu_job(status={"phase": "Pending"}, training={"maxSteps": None, "epochs": 2})
    d = sized(j, sizing_pod("Succeeded", record=done(dataset=dataset)))
    est = d.status["estimate"]
    steps = -(-2 * 40_000 // 8)  # epochs x sequences / sequences per step (batch 8, one GPU)
    assert est["tokensToTrain"] == steps * 8 * 128 and est["dataset"]["counted"] == "sample"


def test_suspending_while_sizing_deletes_the_sizing_pod():
    d = sized(gpu_job(status={"phase": "Pending"}, runPolicy={"suspend": True}), sizing_pod())
    assert d.delete_pods == ["j-size-g1"] and d.create_pods == []
