"""The one pass: observe -> decide -> act for one job, under that job's lock, deciding again on a
write conflict; and the sweep that runs it for every job every progress_poll_seconds.

Level-triggered: a watch event of a job or of one of its pods and the sweep all run this same
pass, so a missed or duplicated event costs nothing. The sweep is what polls trainer progress,
accrues cost, and enforces deadlines and TTLs while nothing else changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kubernetes.client.rest import ApiException

from . import act, observe
from .context import OperatorContext
from .decide import decide
from .kube import api_error_message
from .views import NodeView, PodView

log = logging.getLogger("kubetune.operator")


def reconcile_once(
    ctx: OperatorContext, job: dict[str, Any], pods: tuple[PodView, ...], nodes: dict[str, NodeView], poll: bool
) -> None:
    """Decide and act for one job as read. Runs in a worker thread; the caller holds the job's lock."""
    started = time.perf_counter()
    meta = job["metadata"]
    if meta.get("deletionTimestamp"):
        act.job_deleting(ctx, (meta["namespace"], meta["name"]))
        return  # owner references take the pods and the ConfigMap with it
    try:
        observed = observe.observe(ctx, job, pods, nodes, poll)
        decision = decide(observed)
        act.act(ctx, job, observed.spec, decision)
    finally:  # a pass that ends in a conflict or an API error took time too
        ctx.metrics.reconcile_seconds.observe(time.perf_counter() - started)


async def reconcile(
    ctx: OperatorContext,
    indexes: observe.Indexes,
    namespace: str,
    name: str,
    body: dict[str, Any] | None = None,
    poll: bool = False,
) -> None:
    """One observe -> decide -> act pass for a job. `body`: the job as just seen (a watch event);
    otherwise the last one seen. On a write conflict, read the job afresh and go again."""
    async with ctx.lock((namespace, name)):  # one pass per job at a time; snapshots are taken on the loop thread
        job = body or observe.last_seen_job(ctx, indexes, namespace, name)
        for fresh_read in (False, True):
            if job is None or fresh_read:
                job = await asyncio.to_thread(observe.read_job, ctx, namespace, name)
            if job is None:
                return
            ctx.own_writes.seen(job)
            pods = observe.indexed_pods(indexes, job)
            nodes = observe.indexed_nodes(indexes)
            try:
                await asyncio.to_thread(reconcile_once, ctx, job, pods, nodes, poll)
                return
            except ApiException as e:
                ctx.metrics.reconcile_errors.labels("conflict" if e.status == 409 else "api").inc()
                if e.status == 409 and not fresh_read:
                    continue  # someone (or our own last write) changed the job: decide again
                if e.status == 403 and "being terminated" in (e.body or ""):
                    log.info("job=%s/%s: namespace is being deleted", namespace, name)
                else:
                    log.warning("job=%s/%s reconcile failed: %s %s", namespace, name, e.status, api_error_message(e))
                return


SWEEP_STUCK_SECONDS = 300.0  # no job finished in this long (beyond the poll period): /healthz fails


def sweep_stuck(ctx: OperatorContext, now: float) -> str | None:
    """Why liveness should fail: the sweep has not moved in SWEEP_STUCK_SECONDS plus one period.
    Every call a pass makes is bounded (API request timeouts, the /progress deadline), so a sweep
    this late is hung, and a restart is the cure."""
    if ctx.sweeper is None or ctx.sweeper.done():
        return "the sweep task ended" if ctx.sweeper is not None else None
    late = now - ctx.sweep_beat - ctx.settings.progress_poll_seconds
    return f"the sweep has not moved for {late:.0f} s" if late > SWEEP_STUCK_SECONDS else None


async def sweep(ctx: OperatorContext, indexes: observe.Indexes) -> None:
    """Every progress_poll_seconds: progress, cost, deadlines and TTLs for every job."""
    while True:
        ctx.sweep_beat = time.monotonic()
        await asyncio.sleep(ctx.settings.progress_poll_seconds)
        for namespace, name in list(indexes.jobs):
            ctx.sweep_beat = time.monotonic()
            try:
                await reconcile(ctx, indexes, namespace, name, poll=True)
            except Exception:  # one bad job must not stop the sweep
                ctx.metrics.reconcile_errors.labels("sweep").inc()
                log.exception("job=%s/%s sweep failed", namespace, name)
