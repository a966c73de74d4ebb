"""Checkpoints in S3 that a reader can never see half-written.

Layout under the job's prefix (`TrainerConfig.checkpoint_prefix`, `<uri>/<namespace>/<name>/<uid>`):

    <prefix>/owner.json                                     the attempt that may write (`fence`)
    <prefix>/checkpoints/step-000000123-a2/<files...>       written by attempt 2
    <prefix>/checkpoints/step-000000123-a2/MANIFEST.json    written LAST: the commit point

The manifest (`manifest`) lists every file with its size and sha256, plus the step, the wall time
(RFC 3339) and a `meta` dict (the job's UID, the attempt's token, the config the weights depend on).
A step directory without a manifest is an upload that never finished and is ignored; a committed
checkpoint whose files do not match the manifest, or whose meta names another job's UID, is
skipped on restore in favour of the previous one. Pruning deletes the manifest first, so a
half-deleted checkpoint is never valid either.

Saving: the caller writes the checkpoint to a local directory (the only part training waits
for) and hands it to `save_async`; the store moves it aside and uploads it in the background
(multipart, concurrent), then commits the manifest (If-None-Match: never over another writer's),
then prunes to `keep_last`. At most one upload is in flight; on SIGTERM, `wait()` blocks until it
is durable. With a `fence`, every commit, clear and prune first checks that this attempt still
owns the prefix; pruning never deletes a checkpoint of a newer attempt than the store's own.

Several ranks (DeepSpeed ZeRO shards, one store per rank): `save_async(..., rank=r, world=w)`
uploads this rank's files and its part; rank 0 commits the manifest over every rank's files only
once all parts are there (`shards`). The caller clears the step first (`clear_step`, rank 0) and
lets every rank pass a barrier before any of them writes.

Kept light: no torch import (the operator image has none).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from kubetune_contract.config import S3Spec

from . import s3 as s3mod
from . import shards
from .errors import CorruptCheckpoint, KubetuneError, RetriableError, UserError
from .fence import Fenced
from .manifest import (  # noqa: F401 - re-exported: the store's records
    CHECKPOINTS_DIR,
    FORMAT,
    MANIFEST,
    CheckpointInfo,
    FileEntry,
    Key,
    now_rfc3339,
    parse_step_dir,
    sha256_file,
    step_dir_name,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ metrics
class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        secs = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
        self.save_seconds = Histogram(
            "kubetune_checkpoint_save_seconds",
            "Seconds to make one checkpoint durable in S3 (upload + manifest), after the local save.",
            buckets=secs,
            registry=registry,
        )
        self.blocked_seconds = Histogram(
            "kubetune_checkpoint_blocked_seconds",
            "Seconds save_async() held up training (waiting for the previous upload, staging).",
            buckets=secs,
            registry=registry,
        )
        self.restore_seconds = Histogram(
            "kubetune_checkpoint_restore_seconds",
            "Seconds to find, download and verify the checkpoint resumed from.",
            buckets=secs,
            registry=registry,
        )
        self.upload_bytes = Counter(
            "kubetune_checkpoint_upload_bytes_total", "Checkpoint bytes uploaded to S3.", registry=registry
        )
        self.download_bytes = Counter(
            "kubetune_checkpoint_download_bytes_total", "Checkpoint bytes downloaded from S3.", registry=registry
        )
        self.saves = Counter(
            "kubetune_checkpoint_saves_total", "Checkpoint uploads by result.", ["result"], registry=registry
        )
        self.fallbacks = Counter(
            "kubetune_checkpoint_restore_fallbacks_total",
            "Committed checkpoints skipped on restore because their files did not verify.",
            registry=registry,
        )
        self.last_step = Gauge(
            "kubetune_checkpoint_last_durable_step", "Step of the newest durable checkpoint.", registry=registry
        )
        self.last_time = Gauge(
            "kubetune_checkpoint_last_durable_timestamp_seconds",
            "Unix time the newest checkpoint became durable.",
            registry=registry,
        )


_metrics_lock = threading.Lock()
_metrics_by_registry: dict[int, tuple[CollectorRegistry, _Metrics]] = {}


def _metrics_for(registry: CollectorRegistry | None) -> _Metrics:
    # Collectors register once per registry; several stores in a process share them.
    reg = registry if registry is not None else REGISTRY
    with _metrics_lock:
        hit = _metrics_by_registry.get(id(reg))
        if hit is None or hit[0] is not reg:
            hit = (reg, _Metrics(reg))
            _metrics_by_registry[id(reg)] = hit
        return hit[1]


# -------------------------------------------------------------------------------------- store
@dataclass
class _Listing:
    committed: list[CheckpointInfo]  # newest first, parseable manifests only
    objects: dict[Key, dict[str, int]]  # (step, attempt) -> {relative path: size}
    incomplete: list[Key]  # step dirs without a manifest
    unparsable: list[Key]  # step dirs whose manifest is garbage


class CheckpointStore:
    """Checkpoints of one job under `<prefix_uri>/checkpoints/` (see the module docstring).

    prefix_uri: the job's prefix, `TrainerConfig.checkpoint_prefix`.
    s3: endpoint/region/addressing for a client made here (ignored when `client` is given).
    keep_last: committed checkpoints kept (`checkpoints.keepLast`).
    attempt: this attempt's number: the step directories it writes, the newest it may prune.
    fence: called with what is about to happen before each commit, clear and prune; raises
        (`fence.Fenced`) when a newer attempt owns the prefix. None: no fencing (one writer).
    job_uid: restore skips checkpoints whose manifest names another job's UID.
    registry: Prometheus registry for the kubetune_checkpoint_* metrics (default: the global).
    transfer: a boto3 TransferConfig (default `s3.transfer_config()`: 16 MiB parts, 8 at once).
    """

    def __init__(
        self,
        prefix_uri: str,
        s3: S3Spec | None,
        keep_last: int,
        client: Any = None,
        *,
        attempt: int = 0,
        fence: Callable[[str], None] | None = None,
        job_uid: str | None = None,
        registry: CollectorRegistry | None = None,
        transfer: Any = None,
        hash_workers: int = 2,
        parts_timeout: float = 900.0,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"checkpoints.keepLast must be >= 1, got {keep_last}")
        self.root = s3mod.parse_s3_uri(prefix_uri, field="checkpoints.uri").join(CHECKPOINTS_DIR)
        self.keep_last = keep_last
        self.attempt = attempt
        self._fence = fence
        self.job_uid = job_uid
        self.client = client if client is not None else s3mod.make_client(s3)
        self._transfer = transfer or s3mod.transfer_config()
        self._hash_workers = max(1, hash_workers)
        self._parts_timeout = parts_timeout  # rank 0: how long to wait for the other ranks' shards
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-ckpt-upload")
        self._inflight: Future[CheckpointInfo] | None = None
        self._last_durable: CheckpointInfo | None = None
        self._known_bad: set[Key] = set()  # failed verification here; deleted at the next prune
        self._m = _metrics_for(registry)

    # -- helpers ---------------------------------------------------------------------------
    def step_uri(self, step: int, attempt: int | None = None) -> s3mod.S3Uri:
        return self.root.join(step_dir_name(step, self.attempt if attempt is None else attempt))

    def check_access(self) -> None:
        """Fail fast (UserError) unless we can list, write and delete under the prefix."""
        s3mod.check_access(self.client, self.root, field="checkpoints.uri", write=True)

    def _check_fence(self, what: str) -> None:
        if self._fence is not None:
            self._fence(what)

    def _scan(self, root: s3mod.S3Uri | None = None, read_manifests: bool = True) -> _Listing:
        root = root or self.root
        objects: dict[Key, dict[str, int]] = {}
        base = root.dir_prefix
        for o in s3mod.iter_objects(self.client, root):
            dirname, _, rel = o.key[len(base) :].partition("/")
            key = parse_step_dir(dirname)
            if key is not None and rel:
                objects.setdefault(key, {})[rel] = o.size
        committed: list[CheckpointInfo] = []
        incomplete: list[Key] = []
        unparsable: list[Key] = []
        for key in sorted(objects, reverse=True):
            if MANIFEST not in objects[key]:
                incomplete.append(key)
                continue
            if not read_manifests:
                continue
            uri = root.join(step_dir_name(*key))
            try:
                data = s3mod.get_bytes(self.client, uri.join(MANIFEST))
                committed.append(CheckpointInfo.from_manifest(data, uri=str(uri), expected_step=key[0], attempt=key[1]))
            except s3mod.S3NotFound:
                incomplete.append(key)  # pruned between listing and reading
            except CorruptCheckpoint as exc:
                log.warning("checkpoint manifest unreadable step=%d attempt=%d reason=%s", key[0], key[1], exc)
                unparsable.append(key)
        return _Listing(committed, objects, incomplete, unparsable)

    # -- reading ---------------------------------------------------------------------------
    def list_committed(self) -> list[CheckpointInfo]:
        """Committed checkpoints, newest first (only those with a parseable manifest)."""
        return self._scan().committed

    def restore_latest(self, dest: Path, source: str | None = None) -> CheckpointInfo | None:
        """Download the newest checkpoint whose files verify (size + sha256) into `dest`.

        Falls back to older ones, logging why each was skipped; returns None when none is
        valid. `dest` must be absent or empty; it appears complete or not at all. Transient S3
        errors raise (RetriableError) rather than silently resuming from an older checkpoint.

        source: another job's checkpoint instead of this job's (`checkpoints.resumeFrom`): a step
        directory's URI (that checkpoint only) or a job prefix (its newest valid one); another
        job's UID is then expected. None found there is a UserError: the user named it.
        """
        t0 = time.monotonic()
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise FileExistsError(f"restore destination {dest} exists and is not an empty directory")
        only: Key | None = None
        root = self.root
        if source is not None:
            src = s3mod.parse_s3_uri(source, field="checkpoints.resumeFrom")
            only = parse_step_dir(src.name)
            root = s3mod.S3Uri(src.bucket, src.key.rsplit("/", 1)[0]) if only else src.join(CHECKPOINTS_DIR)
        listing = self._scan(root)
        candidates = [c for c in listing.committed if only is None or c.key == only]
        newest = candidates[0].key if candidates else (-1, -1)
        for key in listing.incomplete:
            if key > newest and (only is None or key == only):
                log.info("checkpoint ignored step=%d attempt=%d reason=no manifest (upload never finished)", *key)
        if source is None:
            self._known_bad.update(listing.unparsable)
        for info in candidates:
            try:
                if source is None and self.job_uid and info.job_uid and info.job_uid != self.job_uid:
                    raise CorruptCheckpoint(f"{info.uri} belongs to job uid {info.job_uid}, not {self.job_uid}")
                self._verify_listing(info, listing.objects.get(info.key, {}))
                nbytes = self._download_verified(info, dest)
            except CorruptCheckpoint as exc:
                log.warning("checkpoint skipped step=%d reason=%s; trying the previous one", info.step, exc)
                if source is None:
                    self._known_bad.add(info.key)
                self._m.fallbacks.inc()
                continue
            seconds = time.monotonic() - t0
            self._m.restore_seconds.observe(seconds)
            self._m.download_bytes.inc(nbytes)
            self._set_durable(info)
            log.info("checkpoint restored step=%d uri=%s bytes=%d seconds=%.2f", info.step, info.uri, nbytes, seconds)
            return info
        if source is not None:
            raise UserError(
                f"checkpoints.resumeFrom: no valid checkpoint at {source} (expected a committed "
                "s3://.../checkpoints/step-<n>-a<attempt> directory, or a job prefix s3://.../<namespace>/<name>/<uid>)"
            )
        log.info("checkpoint none valid under %s; starting from scratch", self.root)
        return None

    @staticmethod
    def _verify_listing(info: CheckpointInfo, remote: dict[str, int]) -> None:
        # Cheap check before downloading: every file is there with the right size.
        for rel, entry in info.files.items():
            if rel not in remote:
                raise CorruptCheckpoint(f"{info.uri}/{rel} is in the manifest but missing")
            if remote[rel] != entry.size:
                raise CorruptCheckpoint(
                    f"{info.uri}/{rel} is {remote[rel]} bytes in S3, the manifest says {entry.size}"
                )

    def _download_verified(self, info: CheckpointInfo, dest: Path) -> int:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.restore-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            uri = s3mod.parse_s3_uri(info.uri)
            try:
                nbytes = s3mod.download_files(
                    self.client, {rel: uri.join(rel) for rel in info.files}, tmp, config=self._transfer
                )
            except s3mod.S3NotFound as exc:
                raise CorruptCheckpoint(f"a file vanished while downloading: {exc}") from None
            rels = list(info.files)
            with ThreadPoolExecutor(self._hash_workers) as pool:
                digests = dict(zip(rels, pool.map(lambda r: sha256_file(tmp / r), rels), strict=True))
            for rel, entry in info.files.items():
                size = (tmp / rel).stat().st_size
                if size != entry.size:
                    raise CorruptCheckpoint(f"{info.uri}/{rel}: downloaded {size} bytes, manifest says {entry.size}")
                if digests[rel] != entry.sha256:
                    raise CorruptCheckpoint(
                        f"{info.uri}/{rel}: sha256 {digests[rel][:16]}… "
                        f"does not match the manifest's {entry.sha256[:16]}…"
                    )
            if dest.exists():
                dest.rmdir()  # empty (checked by the caller)
            tmp.rename(dest)  # the restored directory appears whole
            return nbytes
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- writing ---------------------------------------------------------------------------
    @property
    def in_flight(self) -> bool:
        fut = self._inflight
        return fut is not None and not fut.done()

    def save_async(
        self, step: int, local_dir: Path, meta: dict[str, Any] | None = None, *, rank: int = 0, world: int = 1
    ) -> Future[CheckpointInfo]:
        """Upload the checkpoint in `local_dir` as `step`, in the background.

        With world > 1 local_dir holds this rank's share; rank 0's future resolves once the
        checkpoint over all ranks is committed, another rank's once its own files are durable
        (an uncommitted CheckpointInfo of its files).

        The store owns `local_dir` from now on: it is renamed aside at once (the caller may
        reuse the path for the next save) and deleted after the upload. When the previous
        upload is still running this call waits for it first (at most one in flight: bounded
        local disk, and checkpoints commit in order). The future resolves to the committed
        CheckpointInfo or raises UserError/RetriableError.
        """
        t0 = time.monotonic()
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
        meta = dict(meta or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint meta must be JSON-serialisable: {exc}") from None
        local_dir = Path(local_dir)
        files = s3mod.local_files(local_dir)
        if not files:
            raise ValueError(f"checkpoint directory {local_dir} is empty")
        if MANIFEST in files:
            raise ValueError(f"{local_dir}/{MANIFEST}: the name is reserved for the store's manifest")

        prev = self._inflight
        if prev is not None and not prev.done():
            log.info("checkpoint save waits for the previous upload step=%d", step)
            futures.wait([prev])
        staging = local_dir.with_name(f".{local_dir.name}.upload-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}")
        local_dir.rename(staging)  # same filesystem: instant
        staged = {rel: staging / rel for rel in files}
        fut = self._executor.submit(self._upload, step, staging, staged, meta, rank, world)
        self._inflight = fut
        self._m.blocked_seconds.observe(time.monotonic() - t0)
        return fut

    def _upload(
        self, step: int, staging: Path, files: dict[str, Path], meta: dict[str, Any], rank: int = 0, world: int = 1
    ) -> CheckpointInfo:
        t0 = time.monotonic()
        uri = self.step_uri(step)
        try:
            if world == 1:
                self._clear_step(step)  # sharded: rank 0 cleared it before any rank wrote
            with ThreadPoolExecutor(self._hash_workers) as pool:
                # Hash while uploading: both read the same (page-cached) immutable files.
                digests = {rel: pool.submit(sha256_file, p) for rel, p in files.items()}
                nbytes = s3mod.upload_files(self.client, files, uri, config=self._transfer)
                entries = {rel: FileEntry(p.stat().st_size, digests[rel].result()) for rel, p in files.items()}
            remote = {o.key[len(uri.dir_prefix) :]: o.size for o in s3mod.iter_objects(self.client, uri)}
            for rel, e in entries.items():
                if remote.get(rel) != e.size:
                    raise RetriableError(
                        f"{uri}/{rel}: S3 reports {remote.get(rel)} bytes after upload, expected {e.size}"
                    )
            if world > 1:
                if rank != 0:  # this rank's part: its files are durable; rank 0 commits
                    self._check_fence(f"writing rank {rank}'s part of checkpoint step {step}")
                    part = shards.part_bytes(step, rank, entries)
                    s3mod.put_bytes(self.client, uri.join(shards.part_rel(rank)), part, content_type="application/json")
                    self._m.upload_bytes.inc(nbytes)
                    log.info("checkpoint shards uploaded step=%d rank=%d bytes=%d", step, rank, nbytes)
                    return CheckpointInfo(
                        step=step, uri=str(uri), time=now_rfc3339(), files=entries, meta=meta, attempt=self.attempt
                    )
                entries = self._merge_parts(uri, step, world, entries)
            info = CheckpointInfo(
                step=step, uri=str(uri), time=now_rfc3339(), files=entries, meta=meta, attempt=self.attempt
            )
            self._check_fence(f"committing checkpoint step {step}")
            # The commit point: only now can a reader see this checkpoint (and never over another
            # writer's manifest: a conditional write).
            s3mod.put_bytes(
                self.client,
                uri.join(MANIFEST),
                info.manifest_bytes(),
                content_type="application/json",
                if_none_match=True,
            )
        except Exception as exc:
            self._m.saves.labels(result="failure").inc()
            log.error("checkpoint upload failed step=%d uri=%s error=%s", step, uri, exc)
            if isinstance(exc, KubetuneError):
                raise
            raise RetriableError(f"checkpoint upload to {uri} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        seconds = time.monotonic() - t0
        self._m.save_seconds.observe(seconds)
        self._m.upload_bytes.inc(nbytes)
        self._m.saves.labels(result="success").inc()
        self._set_durable(info)
        log.info(
            "checkpoint committed step=%d uri=%s bytes=%d seconds=%.2f MBps=%.1f",
            step,
            uri,
            nbytes,
            seconds,
            nbytes / s3mod.MB / max(seconds, 1e-9),
        )
        try:
            self._prune(info.key)
        except Fenced:
            raise  # committed, but a newer attempt owns the prefix now: stop
        except Exception as exc:  # noqa: BLE001 - the checkpoint is durable; pruning can wait
            log.warning("checkpoint prune failed under %s: %s", self.root, exc)
        return info

    def _merge_parts(self, uri: s3mod.S3Uri, step: int, world: int, own: dict[str, FileEntry]) -> dict[str, FileEntry]:
        """Rank 0: its own entries and every other rank's, once all ranks' parts are in S3."""
        entries = dict(own)
        parts = shards.await_parts(self.client, uri, step=step, world=world, timeout=self._parts_timeout)
        remote = {o.key[len(uri.dir_prefix) :]: o.size for o in s3mod.iter_objects(self.client, uri)}
        for r, files in parts.items():
            for rel, (size, digest) in files.items():
                if rel in entries:
                    raise RetriableError(f"{uri}/{rel}: written by rank {r} and by another rank")
                if remote.get(rel) != size:
                    raise RetriableError(f"{uri}/{rel} (rank {r}): S3 has {remote.get(rel)} bytes, part says {size}")
                entries[rel] = FileEntry(size, digest)
        return entries

    def clear_step(self, step: int) -> None:
        """Delete whatever an earlier attempt left of this step (manifest first); rank 0, before
        the ranks of a sharded checkpoint write. Only this attempt's directory of the step."""
        self._clear_step(step)

    def _set_durable(self, info: CheckpointInfo) -> None:
        self._last_durable = info
        self._m.last_step.set(info.step)
        self._m.last_time.set(time.time())

    def _delete_step(self, key: Key, keys: dict[str, int]) -> None:
        base = self.step_uri(*key)
        if MANIFEST in keys:  # uncommit first: a half-deleted checkpoint must not look valid
            s3mod.delete_keys(self.client, base.bucket, [base.join(MANIFEST).key])
        rest = [base.join(rel).key for rel in keys if rel != MANIFEST]
        if rest:
            s3mod.delete_keys(self.client, base.bucket, rest)

    def _clear_step(self, step: int) -> None:
        # A retry after a preemption reaches the same step again: start from a clean directory.
        uri = self.step_uri(step)
        existing = {o.key[len(uri.dir_prefix) :]: o.size for o in s3mod.iter_objects(self.client, uri)}
        if existing:
            self._check_fence(f"clearing checkpoint step {step}")
            log.info("checkpoint overwriting step=%d (%d leftover objects)", step, len(existing))
            self._delete_step((step, self.attempt), existing)

    def _prune(self, just_committed: Key) -> None:
        """Keep the newest `keep_last` committed checkpoints (never the one just written);
        delete older ones, ones that failed verification here, and unfinished uploads older
        than the one just committed. Never a checkpoint of a newer attempt than this store's."""
        listing = self._scan(read_manifests=False)
        bad = set(self._known_bad)
        committed = sorted({k for k, objs in listing.objects.items() if MANIFEST in objs}, reverse=True)
        good = [k for k in committed if k not in bad or k == just_committed]
        keep = set(good[: self.keep_last]) | {just_committed}
        doomed = {k for k in committed if k not in keep}
        doomed |= {k for k in listing.incomplete if k < just_committed}
        doomed = {k for k in doomed if k[1] <= self.attempt}  # a newer attempt's are its own business
        if not doomed:
            return
        self._check_fence(f"pruning checkpoints {sorted(doomed)}")
        for key in sorted(doomed):
            self._delete_step(key, listing.objects.get(key, {}))
            self._known_bad.discard(key)
            log.info("checkpoint pruned step=%d attempt=%d", *key)

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until the in-flight upload is durable (e.g. on SIGTERM) and return it; with
        nothing in flight, the last durable checkpoint. Raises TimeoutError when `timeout`
        passes first, or the upload's own error (its data is then not durable)."""
        fut = self._inflight  # no lock: this may run from a signal handler
        if fut is None:
            return self._last_durable
        try:
            return fut.result(timeout=timeout)
        except futures.TimeoutError:
            raise TimeoutError(f"checkpoint upload still running after {timeout}s") from None

    def last_durable(self) -> CheckpointInfo | None:
        """The newest checkpoint this process restored or committed."""
        return self._last_durable

    def close(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait)

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
