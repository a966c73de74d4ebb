"""Pure views of Kubernetes objects: raw pod/node dicts -> the few facts decisions need."""
from __future__ import annotations

from typing import Any

from .decide import NodeView, PodView, parse_time
from .render import CONTAINER, LABEL_ATTEMPT, LABEL_RANK
from .settings import Settings


def pod_view(pod: dict[str, Any]) -> PodView:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    exit_code = reason = message = waiting_reason = waiting_message = None
    started_at = finished_at = None
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") != CONTAINER:
            continue
        state = cs.get("state") or {}
        term = state.get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if term:
            exit_code = term.get("exitCode")
            reason = term.get("reason")
            message = term.get("message")
            started_at, finished_at = parse_time(term.get("startedAt")), parse_time(term.get("finishedAt"))
        elif state.get("running"):
            started_at = parse_time(state["running"].get("startedAt"))
        waiting = state.get("waiting")
        if waiting:
            waiting_reason, waiting_message = waiting.get("reason"), waiting.get("message")
    if reason is None:
        reason = status.get("reason")
    if message is None and status.get("message"):
        message = status["message"]
    disruption = conditions.get("DisruptionTarget")
    scheduled = conditions.get("PodScheduled")
    unschedulable = None
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = scheduled.get("message") or "unschedulable"
    return PodView(
        name=meta.get("name", ""),
        attempt=int(labels.get(LABEL_ATTEMPT, 0)),
        rank=int(labels.get(LABEL_RANK, 0)),
        phase=status.get("phase") or "Pending",
        deleting=bool(meta.get("deletionTimestamp")),
        node=(pod.get("spec") or {}).get("nodeName"),
        ip=status.get("podIP"),
        exit_code=exit_code,
        reason=reason,
        message=message,
        disruption=(disruption.get("reason") or "DisruptionTarget") if disruption and disruption.get("status") == "True" else None,
        unschedulable=unschedulable,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
        started_at=started_at,
        finished_at=finished_at,
    )


def node_view(node: dict[str, Any], settings: Settings) -> NodeView:
    labels = (node.get("metadata") or {}).get("labels") or {}
    spot = labels.get(settings.capacity_type_label) == settings.spot_value
    return NodeView(
        name=node["metadata"]["name"],
        capacity_type="spot" if spot else "on-demand",
        gpu_type=labels.get(settings.gpu_type_label),
    )
