"""kopf wiring only: indexes, watch-event adapters, login, startup and cleanup. No decisions and
no Kubernetes calls here: every event becomes one reconcile pass (reconcile.py: observe.py ->
decide.py -> act.py) with the operator context that startup builds into kopf's memo.

kopf indexes keep jobs, pods and nodes in memory, so observing costs no API reads beyond what
observe.py explains. No timers/daemons and no change-detection handlers: kopf would add
finalizers and annotations to users' jobs, and a job must stay deletable when the operator is
gone. The periodic sweep is one asyncio task, started by the first watch event: its passes post
Events, and kopf.event works only in the context kopf sets up for watch-event handlers (a task
started by the startup handler could not post them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kopf

from . import act, api, metrics, render
from .context import OperatorContext
from .kube import load_client_config
from .observe import Indexes, node_view, plain, pod_view
from .reconcile import reconcile, sweep, sweep_stuck
from .settings import Settings
from .views import NodeView, PodView

log = logging.getLogger("kubetune.operator")
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def context_of(memo: kopf.Memo) -> OperatorContext:
    """The operator context startup() put into kopf's memo (each object's memo is a copy of it)."""
    ctx: OperatorContext = memo["ctx"]
    return ctx


# ---- indexes: in-memory views that kopf fills before any handler runs --------------------


@kopf.index("pods", labels={render.LABEL_JOB_UID: kopf.PRESENT})
def pods_by_job(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, PodView]:
    return {labels[render.LABEL_JOB_UID]: pod_view(body)}


@kopf.index("nodes")
def nodes_by_name(body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> dict[str, NodeView]:
    return {name: node_view(body, context_of(memo).settings)}


@kopf.index(api.GROUP, api.VERSION, api.PLURAL)
def jobs_by_key(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """The last seen body of every job: reconciles start from it instead of a GET."""
    return {(namespace, name): plain(body)}


# ---- watch events -> one pass ---------------------------------------------------------------


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def job_event(
    event: dict[str, Any],
    namespace: str,
    name: str,
    memo: kopf.Memo,
    jobs_by_key: kopf.Index,
    pods_by_job: kopf.Index,
    nodes_by_name: kopf.Index,
    **_: Any,
) -> None:
    ctx = context_of(memo)
    indexes = Indexes(jobs_by_key, pods_by_job, nodes_by_name)
    start_sweep(ctx, indexes)
    if event.get("type") == "DELETED":
        act.job_gone(ctx, (namespace, name))
        return
    job = plain(event["object"])
    if ctx.own_writes.is_echo(job):
        return  # our own status write coming back: it was decided from this very state
    await reconcile(ctx, indexes, namespace, name, body=job)


@kopf.on.event("pods", labels={render.LABEL_JOB_UID: kopf.PRESENT})
async def pod_event(
    labels: kopf.Labels,
    namespace: str,
    memo: kopf.Memo,
    jobs_by_key: kopf.Index,
    pods_by_job: kopf.Index,
    nodes_by_name: kopf.Index,
    **_: Any,
) -> None:
    ctx, indexes = context_of(memo), Indexes(jobs_by_key, pods_by_job, nodes_by_name)
    start_sweep(ctx, indexes)
    await reconcile(ctx, indexes, namespace, labels[render.LABEL_JOB_NAME])


def start_sweep(ctx: OperatorContext, indexes: Indexes) -> None:
    """Once, from a watch-event handler: the task inherits kopf's event-posting context (the
    sweep's passes post Events too). Without jobs nothing needs sweeping."""
    if ctx.sweeper is None:
        ctx.sweeper = asyncio.create_task(sweep(ctx, indexes))


# ---- lifecycle ------------------------------------------------------------------------------


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster: the ServiceAccount token and the KUBERNETES_SERVICE_* address, as client-go
    does (kopf's own helper needs cluster DNS for kubernetes.default.svc). Otherwise $KUBECONFIG
    as it is now (the client library's default path is frozen when it is imported)."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token = SERVICE_ACCOUNT_DIR / "token"
    if host and token.exists():
        host = f"[{host}]" if ":" in host else host
        return kopf.ConnectionInfo(
            server=f"https://{host}:{port}",
            ca_path=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
            token=token.read_text().strip(),  # re-read at every login: projected tokens rotate
            default_namespace=(SERVICE_ACCOUNT_DIR / "namespace").read_text().strip(),
        )
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Build the operator context (once), tune kopf and serve /metrics."""
    options: Settings | None = memo.get("settings")  # main() read them from the environment
    if options is None:  # started by `kopf run` instead of main()
        options = Settings.from_env()
    load_client_config()
    ctx = OperatorContext.create(options)
    memo["ctx"] = ctx
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetune.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # kopf's own log lines become Events only when they matter
    settings.execution.max_workers = 32
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    if options.metrics_port:
        try:
            metrics.serve(ctx.metrics, options.metrics_port)
        except OSError as e:  # port taken (a second operator in one process): run without /metrics
            log.warning("metrics port %s: %s", options.metrics_port, e)
    # Reconciles block on HTTP calls in threads; the default pool (cores + 4) would serialise them.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="reconcile"))
    log.info("kubetune operator started: %s", options.model_dump_json())


@kopf.on.probe(id="sweep")
def sweep_alive(memo: kopf.Memo, **_: Any) -> str:
    """/healthz: fails (HTTP 500) when the sweep is stuck (reconcile.sweep_stuck)."""
    ctx: OperatorContext | None = memo.get("ctx")
    problem = sweep_stuck(ctx, time.monotonic()) if ctx is not None else None
    if problem:
        raise RuntimeError(problem)
    return "ok"


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    ctx: OperatorContext | None = memo.get("ctx")
    if ctx is not None and ctx.sweeper is not None:
        ctx.sweeper.cancel()
