"""kopf adapters: turn watch events into `reconcile()` calls. No decisions here (see decide.py).

Level-triggered: every event of a FineTuneJob or of one of its pods, and a periodic sweep (which
also polls trainer progress, accrues cost, and enforces deadlines and TTLs), runs the same
observe -> decide -> act pass. kopf indexes keep pods and nodes in memory, so observing costs
no API reads beyond one GET of the job. No timers/daemons and no change-detection handlers:
kopf would add finalizers and annotations to users' jobs, and a job must stay deletable when
the operator is gone.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import datetime as dt
import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kubetune_contract.layout import METRICS_PORT
from kubetune_contract.progress import ProgressRecord

from . import api, metrics, render
from .cost import price_per_hour
from .decide import Decision, NodeView, Observed, PodView, current_attempt, decide, pod_rejected
from .kube import Kube, fetch_progress, s3_endpoint_problem
from .observe import node_view, pod_view
from .settings import Settings

log = logging.getLogger("kubetune.operator")
SETTINGS = Settings.from_env()
_kube: Kube | None = None
_locks: dict[tuple[str, str], asyncio.Lock] = {}


class _OwnWrites:
    """What this operator last wrote to each job: its newest known state, and the
    resourceVersions whose watch events are only the echo of our own writes (nothing to do)."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}
        self.versions: dict[tuple[str, str], deque[str]] = {}

    def record(self, job: dict[str, Any]) -> None:
        key = (job["metadata"]["namespace"], job["metadata"]["name"])
        self.latest[key] = job
        self.versions.setdefault(key, deque(maxlen=16)).append(job["metadata"]["resourceVersion"])

    def is_echo(self, job: dict[str, Any]) -> bool:
        key = (job["metadata"]["namespace"], job["metadata"]["name"])
        return job["metadata"].get("resourceVersion") in self.versions.get(key, ())

    def seen(self, job: dict[str, Any]) -> None:
        self.latest[(job["metadata"]["namespace"], job["metadata"]["name"])] = job

    def forget(self, key: tuple[str, str]) -> None:
        self.latest.pop(key, None)
        self.versions.pop(key, None)


_own = _OwnWrites()


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube()
    return _kube


# ---- indexes: in-memory views that kopf fills before any handler runs --------------------

@kopf.index("pods", labels={render.LABEL_JOB_UID: kopf.PRESENT})
def pods_by_job(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, PodView]:
    return {labels[render.LABEL_JOB_UID]: pod_view(body)}


@kopf.index("nodes")
def nodes_by_name(body: kopf.Body, name: str, **_: Any) -> dict[str, NodeView]:
    return {name: node_view(body, SETTINGS)}


@kopf.index(api.GROUP, api.VERSION, api.PLURAL)
def jobs_by_key(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """The last seen body of every job: reconciles start from it instead of a GET; a stale one
    only costs a 409 on the (resourceVersion-conditional) status write and a re-read."""
    return {(namespace, name): plain(body)}


def plain(value: Any) -> Any:
    """kopf's read-only views -> plain dicts and lists (ours to keep and mutate)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# ---- the one pass ---------------------------------------------------------------------------

def _parse_spec(job: dict[str, Any]) -> tuple[api.FineTuneJobSpec | None, str | None]:
    try:
        return api.FineTuneJobSpec.model_validate(job.get("spec") or {}), None
    except ValidationError as e:
        first = e.errors()[0]
        where = "spec." + ".".join(str(p) for p in first["loc"])
        return None, f"{where}: {first['msg']} (the CRD installed may be older than the operator)"


def _recorded_but_unseen(job: dict[str, Any], pods: tuple[PodView, ...]) -> tuple[PodView, ...]:
    """Pods the status records but the index does not hold yet. Ask the API server before
    deciding: a pod just created (its watch event is in flight) must not be created again, and
    one seen by another operator instance (an upgrade overlap) must not count as vanished."""
    status = job.get("status") or {}
    attempt = status.get("attempt") or 0
    known = {p.name for p in pods}
    found = []
    for w in status.get("workers") or []:
        if w.get("attempt") == attempt and w["name"] not in known:
            raw = kube().get_pod(job["metadata"]["namespace"], w["name"])
            if raw is not None:
                found.append(pod_view(raw))
    return tuple(found)


def _observe(job: dict[str, Any], pods: tuple[PodView, ...], nodes: dict[str, NodeView], poll: bool) -> Observed:
    pods = pods + _recorded_but_unseen(job, pods)
    spec, error = _parse_spec(job)
    now = dt.datetime.now(dt.timezone.utc)
    preflight = None
    gpu_known = None
    progress = None
    attempt = current_attempt(job.get("status") or {}, pods)
    starting = spec is not None and not any(p.attempt == attempt for p in pods)
    if starting and spec is not None:
        if spec.s3.credentials_secret:
            preflight = kube().secret_problem(job["metadata"]["namespace"], spec.s3.credentials_secret)
        if preflight is None and SETTINGS.preflight_s3_endpoint:
            preflight = s3_endpoint_problem(spec.s3.endpoint)
    if spec is not None and spec.resources.gpu_type:
        gpu_known = any(n.gpu_type == spec.resources.gpu_type for n in nodes.values())
    if poll:
        rank0 = next((p for p in pods if p.attempt == attempt and p.rank == 0 and p.phase == "Running" and p.ip), None)
        if rank0 is not None:
            raw = fetch_progress(rank0.ip, METRICS_PORT)
            if raw:
                try:
                    progress = ProgressRecord.model_validate(raw)
                except ValidationError:
                    log.warning("job %s: trainer sent an unreadable progress record", job["metadata"]["name"])
    return Observed(
        job=job, spec=spec, spec_error=error, now=now, pods=pods, nodes=nodes,
        preflight_problem=preflight, gpu_type_known=gpu_known, progress=progress,
        gpu_price=lambda node, resources: price_per_hour(SETTINGS, node, resources),
    )


def _act(job: dict[str, Any], spec: api.FineTuneJobSpec | None, d: Decision) -> None:
    k = kube()
    meta = job["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if d.status != (job.get("status") or {}) or d.create_pods:
        _own.record(k.patch_status(job, d.status))  # first: the record of what we are about to create
    if d.ensure_config and spec is not None:
        k.ensure_config_map(render.config_map(job, spec))
    for attempt, rank in d.create_pods:
        assert spec is not None
        pod = render.worker_pod(job, spec, SETTINGS, attempt, rank, d.master_addr or "127.0.0.1", d.on_demand)
        try:
            created = k.create_pod(pod)
        except ApiException as e:
            if e.status not in (400, 403, 422):
                raise
            # Something the user wrote (pass-through env/affinity, quota, priority class) made the
            # API server refuse the pod: say so on the job instead of retrying blindly.
            fresh = k.get_job(ns, name) or job
            status = pod_rejected(fresh.get("status") or {}, api_error_message(e), e.status != 403,
                                  dt.datetime.now(dt.timezone.utc), meta.get("generation"))
            _own.record(k.patch_status(fresh, status))
            post_event(job, "Warning", "PodRejected", status["message"])
            return
        if created:
            metrics.PODS_CREATED.labels(ns).inc()
    for pod_name in d.delete_pods:
        k.delete_pod(ns, pod_name)
    for ev in d.events:
        post_event(job, ev.type, ev.reason, ev.message)
        log.info("job=%s/%s event=%s %s", ns, name, ev.reason, ev.message)
        if ev.reason == "Preempted":
            metrics.PREEMPTIONS.labels(ns).inc()
        elif ev.reason == "WorkerFailed":
            metrics.RESTARTS.labels(ns).inc()
    if d.delete_job:
        log.info("job=%s/%s ttlSecondsAfterFinished passed: deleting it", ns, name)
        k.delete_job(ns, name)
        metrics.JOBS.forget(ns, name)
    else:
        metrics.JOBS.update(ns, name, d.status)


def post_event(job: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Events are best-effort: a namespace being deleted refuses them, and that is fine."""
    try:
        kopf.event(job, type=type_, reason=reason, message=message[:1024])
    except Exception as e:  # noqa: BLE001
        log.info("job=%s/%s event %s not posted: %s", job["metadata"]["namespace"], job["metadata"]["name"], reason, e)


def reconcile_once(job: dict[str, Any], pods: tuple[PodView, ...], nodes: dict[str, NodeView], poll: bool) -> None:
    """Decide and act for one job as read. Runs in a worker thread; the caller holds the job's lock."""
    started = time.perf_counter()
    meta = job["metadata"]
    if meta.get("deletionTimestamp"):
        metrics.JOBS.forget(meta["namespace"], meta["name"])
        return  # owner references take the pods and the ConfigMap with it
    observed = _observe(job, pods, nodes, poll)
    decision = decide(observed)
    _act(job, observed.spec, decision)
    metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)


async def reconcile(namespace: str, name: str, indexes: "Indexes", body: dict[str, Any] | None = None, poll: bool = False) -> None:
    """One observe -> decide -> act pass for a job. `body`: the job as just seen (a watch event);
    otherwise the jobs index's copy. On a write conflict, read the job afresh and go again."""
    lock = _locks.setdefault((namespace, name), asyncio.Lock())
    async with lock:  # one pass per job at a time; snapshots are taken on the loop thread
        job = body or _own.latest.get((namespace, name)) or next(iter(indexes.jobs.get((namespace, name), ())), None)
        for fresh_read in (False, True):
            if job is None or fresh_read:
                job = await asyncio.to_thread(kube().get_job, namespace, name)
            if job is None:
                return
            _own.seen(job)
            pods = tuple(indexes.pods.get(job["metadata"]["uid"], ()))
            nodes = {key: next(iter(store)) for key, store in indexes.nodes.items()}
            try:
                await asyncio.to_thread(reconcile_once, job, pods, nodes, poll)
                return
            except ApiException as e:
                metrics.RECONCILE_ERRORS.labels("conflict" if e.status == 409 else "api").inc()
                if e.status == 409 and not fresh_read:
                    continue  # someone (or our own last write) changed the job: decide again
                if e.status == 403 and "being terminated" in (e.body or ""):
                    log.info("job=%s/%s: namespace is being deleted", namespace, name)
                else:
                    log.warning("job=%s/%s reconcile failed: %s %s", namespace, name, e.status, api_error_message(e))
                return


@dataclass(frozen=True)
class Indexes:
    jobs: kopf.Index
    pods: kopf.Index
    nodes: kopf.Index


def api_error_message(e: ApiException) -> str:
    try:
        return json.loads(e.body or "{}").get("message") or str(e.reason)
    except ValueError:
        return (e.body or str(e.reason))[:800]


# ---- kopf wiring ----------------------------------------------------------------------------

@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def job_event(event: dict[str, Any], namespace: str, name: str, jobs_by_key: kopf.Index, pods_by_job: kopf.Index,
                    nodes_by_name: kopf.Index, **_: Any) -> None:
    if event.get("type") == "DELETED":
        metrics.JOBS.forget(namespace, name)
        _locks.pop((namespace, name), None)
        _own.forget((namespace, name))
        return
    job = plain(event["object"])
    if _own.is_echo(job):
        return  # our own status write coming back: it was decided from this very state
    await reconcile(namespace, name, Indexes(jobs_by_key, pods_by_job, nodes_by_name), body=job)


@kopf.on.event("pods", labels={render.LABEL_JOB_UID: kopf.PRESENT})
async def pod_event(labels: kopf.Labels, namespace: str, jobs_by_key: kopf.Index, pods_by_job: kopf.Index,
                    nodes_by_name: kopf.Index, **_: Any) -> None:
    await reconcile(namespace, labels[render.LABEL_JOB_NAME], Indexes(jobs_by_key, pods_by_job, nodes_by_name))


async def _sweep(indexes: Indexes) -> None:
    """Every progress_poll_seconds: progress, cost, deadlines and TTLs for every job."""
    while True:
        await asyncio.sleep(SETTINGS.progress_poll_seconds)
        for namespace, name in list(indexes.jobs):
            try:
                await reconcile(namespace, name, indexes, poll=True)
            except Exception:  # one bad job must not stop the sweep
                metrics.RECONCILE_ERRORS.labels("sweep").inc()
                log.exception("job=%s/%s sweep failed", namespace, name)


_sweeper: asyncio.Task | None = None


SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


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
            server=f"https://{host}:{port}", ca_path=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
            token=token.read_text().strip(),  # re-read at every login: projected tokens rotate
            default_namespace=(SERVICE_ACCOUNT_DIR / "namespace").read_text().strip(),
        )
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, jobs_by_key: kopf.Index, pods_by_job: kopf.Index,
                  nodes_by_name: kopf.Index, **_: Any) -> None:
    global _sweeper
    from kubernetes import config as kconfig

    try:
        kconfig.load_incluster_config()
    except kconfig.ConfigException:
        kconfig.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # read now, not at import
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetune.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # kopf's own log lines become Events only when they matter
    settings.execution.max_workers = 32
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    if SETTINGS.metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(SETTINGS.metrics_port)
        except OSError as e:  # a second operator in one process (tests) shares the first one's server
            log.warning("metrics port %s: %s", SETTINGS.metrics_port, e)
    # Reconciles block on HTTP calls in threads; the default pool (cores + 4) would serialise them.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="reconcile"))
    _sweeper = asyncio.create_task(_sweep(Indexes(jobs_by_key, pods_by_job, nodes_by_name)))
    log.info("kubetune operator started: %s", SETTINGS.model_dump_json())


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.cancel()
