"""Observe: every read of a reconcile pass, ending in one `views.Observed` for `decide`.

Most of it comes from memory: kopf indexes hold every job, worker pod and node (`Indexes`), and
`pod_view`/`node_view` turn raw objects into views as kopf fills them. Only a few reads go out,
each only when needed: a GET of a pod the status records but the index lacks (its watch event may
still be in flight, or another operator instance created it), a TCP connect to the S3
endpoint before an attempt starts, and rank 0's /progress during a sweep. The
job's sizing pod (render.sizing_pod) is in the same index; `observe` keeps it apart from the workers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import kopf
from pydantic import ValidationError

from kubetune_contract.layout import METRICS_PORT
from kubetune_contract.progress import ProgressRecord

from . import api, policy
from .context import OperatorContext
from .cost import gpu_hour_prices, price_per_hour
from .kube import Kube
from .render import CONTAINER, LABEL_ATTEMPT, LABEL_RANK, LABEL_ROLE
from .settings import Settings
from .timeutil import parse_time, utc_now
from .views import NodeView, Observed, PodView, current_attempt

log = logging.getLogger("kubetune.operator")


# ---- memory: kopf's indexes and the views they hold ------------------------------------------


@dataclass(frozen=True)
class Indexes:
    """kopf's in-memory indexes (see handlers): jobs by (namespace, name), PodViews by job UID,
    NodeViews by node name."""

    jobs: kopf.Index
    pods: kopf.Index
    nodes: kopf.Index


def plain(value: Any) -> Any:
    """kopf's read-only views -> plain dicts and lists (ours to keep and mutate)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def last_seen_job(ctx: OperatorContext, indexes: Indexes, namespace: str, name: str) -> dict[str, Any] | None:
    """This operator's own last write of the job, else the jobs index's copy (no API read). A stale
    one only costs a 409 on the (resourceVersion-conditional) status write and a re-read."""
    return ctx.own_writes.latest.get((namespace, name)) or next(iter(indexes.jobs.get((namespace, name), ())), None)


def indexed_pods(indexes: Indexes, job: dict[str, Any]) -> tuple[PodView, ...]:
    return tuple(indexes.pods.get(job["metadata"]["uid"], ()))


def indexed_nodes(indexes: Indexes) -> dict[str, NodeView]:
    return {key: next(iter(store)) for key, store in indexes.nodes.items()}


def read_job(ctx: OperatorContext, namespace: str, name: str) -> dict[str, Any] | None:
    """The job afresh from the API server (after a conflict); None when it is gone."""
    return ctx.kube.get_job(namespace, name)


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
        disruption=(disruption.get("reason") or "DisruptionTarget")
        if disruption and disruption.get("status") == "True"
        else None,
        unschedulable=unschedulable,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
        created_at=parse_time(meta.get("creationTimestamp")),
        started_at=started_at,
        finished_at=finished_at,
        role=labels.get(LABEL_ROLE, "worker"),
    )


def node_view(node: dict[str, Any], settings: Settings) -> NodeView:
    """Spot or on-demand (settings.capacity_type_label/spot_value) and the GPU product label."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    spot = labels.get(settings.capacity_type_label) == settings.spot_value
    return NodeView(
        name=node["metadata"]["name"],
        capacity_type="spot" if spot else "on-demand",
        gpu_type=labels.get(settings.gpu_type_label),
    )


# ---- one job's observation --------------------------------------------------------------------


def observe(
    ctx: OperatorContext, job: dict[str, Any], pods: tuple[PodView, ...], nodes: dict[str, NodeView], poll: bool
) -> Observed:
    """Everything `decide` may look at for `job`, given its indexed pods and all nodes. `poll`:
    a sweep pass, which also asks the running rank 0 for progress."""
    sizing = tuple(p for p in pods if p.role == "sizing")
    pods = tuple(p for p in pods if p.role != "sizing")
    pods = pods + recorded_but_unseen(ctx.kube, job, pods)
    spec, error = parse_spec(job)
    now = utc_now()
    preflight = None
    gpu_known = None
    progress = None
    attempt = current_attempt(job.get("status") or {}, pods)
    starting = spec is not None and not any(p.attempt == attempt for p in pods)
    if starting and spec is not None:
        preflight = preflight_problem(ctx, job["metadata"]["namespace"], spec)
    if spec is not None and spec.resources.gpu_type:
        gpu_known = any(n.gpu_type == spec.resources.gpu_type for n in nodes.values())
    if poll:
        progress = polled_progress(job, pods, attempt)
    settings = ctx.settings
    return Observed(
        job=job,
        spec=spec,
        spec_error=error,
        now=now,
        pods=pods,
        nodes=nodes,
        preflight_problem=preflight,
        gpu_type_known=gpu_known,
        progress=progress,
        gpu_price=lambda node, resources: price_per_hour(settings, node, resources),
        sizing_pods=sizing,
        gpu_hour_prices=gpu_hour_prices(settings, spec.resources.gpu_type, spec.capacity.policy)
        if spec is not None and spec.resources.gpus
        else None,
    )


def parse_spec(job: dict[str, Any]) -> tuple[api.FineTuneJobSpec | None, str | None]:
    """The spec as the operator's models read it, or why they cannot (a CRD older than the operator)."""
    try:
        return api.FineTuneJobSpec.model_validate(job.get("spec") or {}), None
    except ValidationError as e:
        first = e.errors()[0]
        where = "spec." + ".".join(str(p) for p in first["loc"])
        if first["type"] == "value_error":  # schema-valid but unusable (an endpoint, an affinity shape)
            return None, f"{where}: {first['msg'].removeprefix('Value error, ')}"
        return None, f"{where}: {first['msg']} (the CRD installed may be older than the operator)"


def recorded_but_unseen(kube: Kube, job: dict[str, Any], pods: tuple[PodView, ...]) -> tuple[PodView, ...]:
    """Pods the status records but the index does not hold yet. Ask the API server before
    deciding: a pod just created (its watch event is in flight) must not be created again, and
    one seen by another operator instance (an upgrade overlap) must not count as vanished."""
    status = job.get("status") or {}
    attempt = status.get("attempt") or 0
    known = {p.name for p in pods}
    found = []
    for w in status.get("workers") or []:
        if w.get("attempt") == attempt and w["name"] not in known:
            raw = kube.get_pod(job["metadata"]["namespace"], w["name"])
            if raw is not None:
                found.append(pod_view(raw))
    return tuple(found)


def polled_progress(job: dict[str, Any], pods: tuple[PodView, ...], attempt: int) -> ProgressRecord | None:
    """The running rank 0's /progress, if it answers with a readable record."""
    rank0 = next((p for p in pods if p.attempt == attempt and p.rank == 0 and p.phase == "Running" and p.ip), None)
    if rank0 is None or rank0.ip is None:
        return None
    raw = fetch_progress(rank0.ip, METRICS_PORT)
    if not raw:
        return None
    try:
        return ProgressRecord.model_validate(raw)
    except ValidationError:
        log.warning("job %s: trainer sent an unreadable progress record", job["metadata"]["name"])
        return None


# ---- reads outside the indexes ---------------------------------------------------------------


def preflight_problem(ctx: OperatorContext, namespace: str, spec: api.FineTuneJobSpec) -> tuple[str, str] | None:
    """(reason, message) when the job cannot start yet: a pass-through field the platform's policy
    refuses (policy.py), or its S3 endpoint is unusable. The credentials Secret is not read: the
    operator holds no Secret access, and the kubelet reports a missing Secret or key itself
    (CreateContainerConfigError, which reaches the Running condition)."""
    problem = policy.violation(spec, ctx.settings.pod_policy, ctx.settings.trainer_image)
    if problem is None and ctx.settings.preflight_s3_endpoint:
        problem = s3_endpoint_problem(spec.s3.endpoint)
    return problem


def s3_endpoint_problem(endpoint: str | None, timeout: float = 2.0) -> tuple[str, str] | None:
    """A TCP connect to the S3 endpoint: unreachable endpoints fail here, not after a pod starts."""
    if not endpoint:
        return None
    url = urlparse(endpoint)  # validated by the spec model (S3Spec): a host and a port in range
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError:
        # Reachable or not, nothing more: the error's kind (refused, timed out, no route) would make
        # the operator a port scanner of its own network for whoever creates jobs.
        return (
            "S3EndpointUnreachable",
            f"cannot reach spec.s3.endpoint {endpoint} from the operator; "
            "check the URL, the Service/DNS name and network policies",
        )


PROGRESS_DEADLINE_SECONDS = 2.0  # the whole call: connect, request, headers and body
PROGRESS_MAX_BYTES = 64 * 1024  # a ProgressRecord is < 4 kB


def fetch_progress(
    ip: str, port: int, deadline: float = PROGRESS_DEADLINE_SECONDS, max_bytes: int = PROGRESS_MAX_BYTES
) -> dict[str, Any] | None:
    """GET the trainer's /progress; None when it cannot be reached (starting, or we are off-cluster)
    or misbehaves. Bounded whatever the trainer does: one total deadline (a byte-by-byte drip does
    not reset it), a capped body, no redirects followed (a 3xx is not progress), a reply that is
    not HTTP or not JSON is None. The trainer's address is a pod IP the operator chose, not user input."""
    start = time.monotonic()
    conn = http.client.HTTPConnection(ip, port, timeout=deadline)
    timer: threading.Timer | None = None
    try:
        conn.connect()
        sock = conn.sock
        assert sock is not None
        # The total deadline: whatever read is blocked then (a status line dripping in, a body) ends.
        timer = threading.Timer(max(0.0, deadline - (time.monotonic() - start)), _shut, (sock,))
        timer.daemon = True
        timer.start()
        conn.request("GET", "/progress", headers={"Accept": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}")  # 3xx too: redirects are never followed
        body = resp.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise ValueError(f"reply over {max_bytes} bytes")
        return json.loads(body)
    except (OSError, ValueError, http.client.HTTPException) as e:
        log.debug("progress from %s unavailable: %s", ip, e)
        return None
    finally:
        if timer is not None:
            timer.cancel()
        conn.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
