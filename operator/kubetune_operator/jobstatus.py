"""The status half of a reconcile decision: conditions, the trainer's progress and last words,
Events to post, and the status after the API server refused a pod. Pure; decide.py uses these
for every job, act.py for a refused pod."""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

from kubetune_contract.progress import ProgressRecord

from . import api
from .timeutil import rfc3339
from .views import PodView

STATUS_KEYS = {f.alias or n for n, f in api.FineTuneJobStatus.model_fields.items()}


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the job."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def set_condition(
    status: dict[str, Any], ctype: str, value: bool, reason: str, message: str, now: dt.datetime, generation: int | None
) -> bool:
    """Upsert a condition; lastTransitionTime changes only when the status flips. True if it flipped."""
    conditions = status.setdefault("conditions", [])
    new_status = "True" if value else "False"
    for cond in conditions:
        if cond["type"] == ctype:
            flipped = cond["status"] != new_status
            if flipped:
                cond["lastTransitionTime"] = rfc3339(now)
            cond.update(status=new_status, reason=reason, message=message, observedGeneration=generation)
            return flipped
    conditions.append(
        {
            "type": ctype,
            "status": new_status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": rfc3339(now),
            "observedGeneration": generation,
        }
    )
    return True


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), None)


def trainer_message(pod: PodView) -> str:
    """The trainer's own words (its final ProgressRecord's message) or what Kubernetes said."""
    if pod.message:
        try:
            record = ProgressRecord.model_validate_json(pod.message)
            if record.message:
                return record.message
        except ValueError:
            return pod.message.strip()[-1024:]
    bits = [f"exit code {pod.exit_code}" if pod.exit_code is not None else None, pod.reason]
    return f"worker {pod.name}: " + ", ".join(b for b in bits if b)


def apply_progress(st: dict[str, Any], record: ProgressRecord, now: dt.datetime) -> None:
    if record.phase in ("starting", "preflight", "loading") and st.get("progress"):
        return  # a resuming trainer says step 0 until its checkpoint is loaded: keep the last progress
    prog = {
        "step": record.step,
        "totalSteps": record.total_steps,
        "epoch": record.epoch,
        "progressPercentage": record.progress_percentage,
        "estimatedRemainingSeconds": record.estimated_remaining_seconds,
        "loss": record.loss,
        "evalLoss": record.eval_loss,
        "tokensPerSecond": record.tokens_per_second,
        "resumedFromStep": record.resumed_from_step,
        "updateTime": rfc3339(now),
    }
    st["progress"] = {k: v for k, v in prog.items() if v is not None}
    if record.last_checkpoint:
        st["lastCheckpoint"] = record.last_checkpoint.to_json_dict()
    if record.output_uri:
        st["outputUri"] = record.output_uri


def final_record(pod: PodView) -> ProgressRecord | None:
    if not pod.message:
        return None
    try:
        return ProgressRecord.model_validate_json(pod.message)
    except ValueError:
        return None


def pod_rejected(
    status: dict[str, Any],
    message: str,
    permanent: bool,
    now: dt.datetime,
    generation: int | None,
    reason: str = "PodRejected",
) -> dict[str, Any]:
    """Status after the API server refused a trainer pod: invalid pass-through fields fail the
    job (retrying cannot help); a quota refusal (403) keeps it Pending with the reason."""
    st = {k: v for k, v in copy.deepcopy(status).items() if k in STATUS_KEYS}
    text = f"the API server rejected the trainer pod: {message}"
    if permanent:
        st.update(phase="Failed", message=text, completionTime=rfc3339(now))
        set_condition(st, "Failed", True, reason, text, now, generation)
        set_condition(st, "Ready", False, reason, text, now, generation)
    else:
        st.update(phase=st.get("phase") or "Pending", message=text)
        set_condition(st, "Ready", False, reason, text, now, generation)
    st.pop("workers", None)
    return st
