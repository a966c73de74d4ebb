"""The sizing half of the decision: before the first GPU pod of an attempt, a GPU job is sized in
a CPU-only pod (render.sizing_pod) and estimated (kubetune_contract.estimate) into status.estimate;
a job that cannot fit is held with advice instead of dying with CUDA OOM on a paid GPU. Pure.

status.estimate.result decides:
- Fits, FitUnknown (GPU type not in the table): proceed to the worker pods.
- WontFit: hold (Ready=False, reason WontFit, the advice in the message, one Warning event). Any
  spec edit that changes the estimate is estimated again; one that fits proceeds.
- Failed (the sizing pod's user error: no config.json, access denied, no records): hold (Ready=False,
  reason SizingFailed) until the spec changes (any edit: a new generation runs a new sizing pod).
- Unavailable (the sizing pod crashed, was evicted, or did not finish in SIZING_TIMEOUT_SECONDS):
  proceed without an estimate, with a Warning event; the job is no worse off than without sizing.

Keys: `specHash` covers what the estimate reads (method, lora, training, GPUs, workers, capacity
policy, base model, dataset); `inputsHash` what the sizing pod read (the base model, and the
dataset and its tokenisation for a job given in epochs). A spec change that keeps the inputs is
re-estimated from the stored facts at once, without a pod; one that changes them runs a new pod
(`<job>-size-g<generation>`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from kubetune_contract.estimate import EstimateError, ModelArch, Plan, estimate
from kubetune_contract.progress import ExitCode, ProgressRecord
from kubetune_contract.sizing import DatasetFacts, SizingRecord

from . import api
from .jobstatus import Event, condition, set_condition
from .render import SIZING_DEADLINE_SECONDS
from .timeutil import rfc3339
from .views import Observed, PodView

SIZING_TIMEOUT_SECONDS = SIZING_DEADLINE_SECONDS + 60  # from the pod's creation (image pull included)
PROCEED = {"Fits", "FitUnknown", "Unavailable"}
ESTIMATE_KEYS = {f.alias or n for n, f in api.Estimate.model_fields.items()}


@dataclass
class Sizing:
    """What the sizing step wants: proceed to the workers, or wait/hold (with a pod to create)."""

    proceed: bool
    create_pod: str | None = None
    keep_pod: str | None = None  # the sizing pod still awaited; every other one is deleted
    events: list[Event] = field(default_factory=list)


def needed(spec: api.FineTuneJobSpec) -> bool:
    return spec.resources.gpus > 0 and spec.preflight.estimate


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def inputs_hash(spec: api.FineTuneJobSpec) -> str:
    """What the sizing pod reads: config.json, and for an epochs job the dataset as tokenised."""
    t = spec.training
    parts: dict[str, Any] = {"baseModel": spec.base_model.to_json_dict()}
    if t.max_steps is None:
        parts.update(dataset=spec.dataset.to_json_dict(), seq=t.max_seq_length, packing=t.packing, seed=t.seed)
    return _digest(parts)


def spec_hash(spec: api.FineTuneJobSpec) -> str:
    r = spec.resources
    return _digest(
        {
            "inputs": inputs_hash(spec),
            "method": spec.method,
            "lora": spec.lora.to_json_dict(),
            "training": spec.training.to_json_dict(),
            "resources": [r.gpus, r.gpu_type, r.workers],
            "policy": spec.capacity.policy,
        }
    )


def sizing_pod_name(job_name: str, generation: int | None) -> str:
    """One per generation: a pod of an earlier spec, still being deleted, is never read as this one's."""
    return f"{job_name}-size-g{generation or 0}"


def estimate_status(
    spec: api.FineTuneJobSpec,
    model_facts: dict[str, Any],
    dataset: DatasetFacts | None,
    prices: tuple[float, float] | None,
    gen: int | None,
    now: dt.datetime,
) -> dict[str, Any]:
    """status.estimate of `spec` from the sizing facts (pure; no pod needed when they are stored)."""
    r, t = spec.resources, spec.training
    base: dict[str, Any] = {
        "specHash": spec_hash(spec),
        "inputsHash": inputs_hash(spec),
        "observedGeneration": gen,
        "time": rfc3339(now),
        "modelFacts": model_facts,
        "gpuType": r.gpu_type,
    }
    if dataset is not None:
        base["dataset"] = dataset.to_json_dict()
    try:
        arch = ModelArch.from_config(model_facts)
    except EstimateError as e:
        return {**base, "result": "FitUnknown", "fits": None, "notes": [f"no estimate: {e}"]}
    plan = Plan(
        method=spec.method, training=t, lora=spec.lora, gpus_per_worker=r.gpus, workers=r.workers, gpu_type=r.gpu_type
    )
    # The estimator counts steps from tokens of maxSeqLength-long sequences, as the trainer batches them.
    tokens = dataset.sequences * t.max_seq_length if dataset is not None else None
    out = estimate(arch, plan, price_per_gpu_hour=prices, dataset_tokens=tokens or None)
    result = "FitUnknown" if out["fits"] is None else ("Fits" if out["fits"] else "WontFit")
    kept = {k: v for k, v in out.items() if k in ESTIMATE_KEYS}
    return {**base, **kept, "usdPerGpuHour": None if prices is None else list(prices), "result": result}


def wont_fit_message(est: dict[str, Any]) -> str:
    # Numbers as %g: 80.0 comes back from the API server as 80, and the message must not change.
    need, cap = float(est.get("gpuMemoryGiB") or 0), float(est.get("gpuCapacityGiB") or 0)
    msg = (
        f"does not fit: about {need:g} GiB per GPU, {est.get('gpuType')} has {cap:g} GiB (status.estimate); "
        "no GPU was requested."
    )
    advice = est.get("advice") or []
    if advice:
        tips = "; ".join(
            ", ".join(f"{k}={json.dumps(v)}" for k, v in a["fields"].items())
            + f" ({float(a['gpuMemoryGiB']):g} GiB: {a['message']})"
            for a in advice[:4]
        )
        msg += f" Any one of these fits: {tips}."
    else:
        msg += " " + " ".join(est.get("notes") or [])
    return msg + " Or set spec.preflight.estimate: false to run it anyway."


def _record(pod: PodView) -> tuple[SizingRecord | None, str]:
    """The pod's SizingRecord, else (None, its words: a ProgressRecord's message, the raw text, the reason)."""
    text = (pod.message or "").strip()
    if text:
        try:
            return SizingRecord.model_validate_json(text), ""
        except ValueError:
            pass
        try:
            return None, ProgressRecord.model_validate_json(text).message or text[-1024:]
        except ValueError:
            return None, text[-1024:]
    bits = [f"exit code {pod.exit_code}" if pod.exit_code is not None else None, pod.reason]
    return None, ", ".join(b for b in bits if b) or "no termination message"


def _verdict(st: dict[str, Any], obs: Observed, est: dict[str, Any], events: list[Event]) -> bool:
    """Conditions and events for a decided estimate; True: go on to the workers."""
    gen, now = obs.job["metadata"].get("generation"), obs.now
    ready = condition(st, "Ready") or {}
    result = est["result"]
    if result == "WontFit":
        message = wont_fit_message(est)
        if ready.get("reason") != "WontFit" or ready.get("message") != message:
            events.append(Event("Warning", "WontFit", message))
        set_condition(st, "Ready", False, "WontFit", message, now, gen)
        st["message"] = message
        return False
    if result == "Failed":
        message = (
            f"sizing failed: {est.get('error')}. Fix it and edit the spec (a new generation is sized again), "
            "or set spec.preflight.estimate: false"
        )
        if ready.get("reason") != "SizingFailed":
            events.append(Event("Warning", "SizingFailed", message))
        set_condition(st, "Ready", False, "SizingFailed", message, now, gen)
        st["message"] = message
        return False
    return True


def _settled(est: dict[str, Any], spec: api.FineTuneJobSpec, gen: int | None) -> bool:
    """The stored estimate stands for this spec (a failure: for this generation)."""
    if est.get("result") in ("Failed", "Unavailable"):
        return est.get("specHash") == spec_hash(spec) and est.get("observedGeneration") == gen
    return est.get("specHash") == spec_hash(spec)


def size(st: dict[str, Any], obs: Observed) -> Sizing:
    """Estimate before the attempt's first GPU pod: from status, the stored facts, or a sizing pod."""
    spec = obs.spec
    assert spec is not None
    gen, now = obs.job["metadata"].get("generation"), obs.now
    est = st.get("estimate") or {}
    events: list[Event] = []
    if est and _settled(est, spec, gen):
        return Sizing(_verdict(st, obs, est, events), events=events)
    facts_ok = est.get("result") not in (None, "Failed", "Unavailable") and est.get("modelFacts") is not None
    if facts_ok and est.get("inputsHash") == inputs_hash(spec):
        dataset = DatasetFacts.model_validate(est["dataset"]) if est.get("dataset") else None
        st["estimate"] = estimate_status(spec, est["modelFacts"], dataset, obs.gpu_hour_prices, gen, now)
        return Sizing(_verdict(st, obs, st["estimate"], events), events=events)

    name = sizing_pod_name(obs.job["metadata"]["name"], gen)
    pod = next((p for p in obs.sizing_pods if p.name == name), None)
    failed = None
    if pod is not None and pod.phase == "Succeeded":
        record, why = _record(pod)
        if record is not None and record.phase == "done":
            st["estimate"] = estimate_status(spec, record.model_facts, record.dataset, obs.gpu_hour_prices, gen, now)
            if st["estimate"]["result"] != "WontFit":
                summary = f"{st['estimate'].get('gpuMemoryGiB')} GiB per GPU ({st['estimate']['result']})"
                events.append(Event("Normal", "Estimated", f"{summary}; status.estimate"))
            return Sizing(_verdict(st, obs, st["estimate"], events), events=events)
        failed = (False, why or "the sizing pod reported no result")
    elif pod is not None and pod.phase == "Failed":
        record, why = _record(pod)
        failed = (pod.exit_code == ExitCode.USER_ERROR, (record.message if record else None) or why)
    elif pod is not None and pod.created_at and (now - pod.created_at).total_seconds() > SIZING_TIMEOUT_SECONDS:
        failed = (False, f"did not finish within {SIZING_TIMEOUT_SECONDS} s ({_waiting(pod) or pod.phase})")
    if failed is not None:
        user_error, why = failed
        result = "Failed" if user_error else "Unavailable"
        st["estimate"] = {
            "result": result,
            "specHash": spec_hash(spec),
            "inputsHash": inputs_hash(spec),
            "observedGeneration": gen,
            "time": rfc3339(now),
            "error": f"sizing pod {name}: {why}",
            "fits": None,
        }
        if result == "Unavailable":
            events.append(
                Event("Warning", "SizingUnavailable", f"{st['estimate']['error']}; starting without an estimate")
            )
        return Sizing(_verdict(st, obs, st["estimate"], events), events=events)

    # Waiting for the sizing pod (or creating it).
    state = "creating it" if pod is None else (_waiting(pod) or pod.phase)
    message = f"estimating GPU memory before requesting GPUs: sizing pod {name} (CPU only): {state}"
    set_condition(st, "Ready", False, "Sizing", message, now, gen)
    st["message"] = message
    if pod is None:
        events.append(Event("Normal", "Sizing", f"created sizing pod {name} (CPU only, no GPU requested)"))
    return Sizing(False, create_pod=name if pod is None else None, keep_pod=name, events=events)


def _waiting(pod: PodView) -> str | None:
    if pod.unschedulable:
        return f"unschedulable: {pod.unschedulable}"
    if pod.waiting_reason:
        return f"{pod.waiting_reason}: {pod.waiting_message or ''}".strip(": ")
    return None
