"""Act: every write of a reconcile pass, carrying out one `decide.Decision`.

The status write comes first: a merge patch conditional on the resourceVersion the decision was
made from (a 409 means someone changed the job: the caller decides again), and the record of
the pods about to be created, so that a crash after it neither loses nor duplicates them. Then
the ConfigMap and pods ("get, else create"), pod deletions (404 is fine), events, metrics.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from . import api, render
from .context import JobKey, OperatorContext
from .decide import Decision
from .jobstatus import STATUS_KEYS, condition, pod_rejected
from .kube import api_error_message
from .metrics import JobInfo
from .observe import read_job
from .timeutil import utc_now

log = logging.getLogger("kubetune.operator")
EVENT_MESSAGE_MAX_CHARS = 1024  # Events are short notes (events.k8s.io caps a note at 1 kB)


def act(ctx: OperatorContext, job: dict[str, Any], spec: api.FineTuneJobSpec | None, d: Decision) -> None:
    k = ctx.kube
    meta = job["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if d.status != (job.get("status") or {}) or d.create_pods:
        # A merge patch keeps what it does not name: null the fields the decision dropped (workers).
        dropped = {key: None for key in job.get("status") or {} if key in STATUS_KEYS and key not in d.status}
        ctx.own_writes.record(k.patch_status(job, {**dropped, **d.status}))  # first: the record of what we create
    if d.ensure_config and spec is not None:
        k.ensure_config_map(render.config_map(job, spec))
    if d.create_sizing_pod and spec is not None:
        try:
            k.create_pod(render.sizing_pod(job, spec, ctx.settings, d.create_sizing_pod))
        except ApiException as e:
            if e.status not in (400, 403, 422):
                raise
            _pod_rejected(ctx, job, e)
            return
    for attempt, rank in d.create_pods:
        assert spec is not None
        master = d.master_addr or "127.0.0.1"
        pod = render.worker_pod(job, spec, ctx.settings, attempt, rank, master, d.on_demand, d.job_cost)
        try:
            created = k.create_pod(pod)
        except ApiException as e:
            if e.status not in (400, 403, 422):
                raise
            _pod_rejected(ctx, job, e)
            return
        if created:
            ctx.metrics.pods_created.labels(job_namespace=ns).inc()
    for pod_name in d.delete_pods:
        k.delete_pod(ns, pod_name)
    for ev in d.events:
        post_event(job, ev.type, ev.reason, ev.message)
        log.info("job=%s/%s event=%s %s", ns, name, ev.reason, ev.message)
    if d.delete_job:
        log.info("job=%s/%s ttlSecondsAfterFinished passed: deleting it", ns, name)
        k.delete_job(ns, name)
        ctx.metrics.jobs.forget(ns, name)
    else:
        ctx.metrics.jobs.update(ns, name, d.status, JobInfo.of(spec))  # preemptions, restarts, cost: from status


def _pod_rejected(ctx: OperatorContext, job: dict[str, Any], e: ApiException) -> None:
    """Something the user wrote (pass-through env/affinity, quota, priority class) made the API
    server refuse the pod: say so on the job instead of retrying blindly. Invalid fields (400/422)
    and a Pod Security admission refusal (403 "violates PodSecurity": the namespace's level, which
    retrying cannot change) fail the job; another 403 (a ResourceQuota) keeps it Pending, with one
    Warning per new message, not one per sweep."""
    meta = job["metadata"]
    fresh = read_job(ctx, meta["namespace"], meta["name"]) or job
    message = api_error_message(e)
    pod_security = e.status == 403 and "violates PodSecurity" in message
    before = condition(fresh.get("status") or {}, "Ready") or {}
    status = pod_rejected(
        fresh.get("status") or {},
        message,
        e.status != 403 or pod_security,
        utc_now(),
        meta.get("generation"),
        reason="PodSecurityViolation" if pod_security else "PodRejected",
    )
    ctx.own_writes.record(ctx.kube.patch_status(fresh, status))
    after = condition(status, "Ready") or {}
    if status.get("phase") == "Failed" or (before.get("reason"), before.get("message")) != (
        after.get("reason"),
        after.get("message"),
    ):
        post_event(job, "Warning", after.get("reason") or "PodRejected", status["message"])


def post_event(job: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Events are best-effort: a namespace being deleted refuses them, and that is fine."""
    try:
        kopf.event(job, type=type_, reason=reason, message=message[:EVENT_MESSAGE_MAX_CHARS])
    except Exception as e:  # noqa: BLE001
        log.info("job=%s/%s event %s not posted: %s", job["metadata"]["namespace"], job["metadata"]["name"], reason, e)


def job_deleting(ctx: OperatorContext, key: JobKey) -> None:
    """Deletion has begun: owner references take the pods and the ConfigMap with it; stop exporting it."""
    ctx.metrics.jobs.forget(*key)


def job_gone(ctx: OperatorContext, key: JobKey) -> None:
    """The job is deleted: forget its metrics, lock and own-writes record."""
    ctx.metrics.jobs.forget(*key)
    ctx.forget(key)
