"""CheckpointStore and kubetune_trainer.s3 against a real MinIO server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kubetune_contract.config import S3Spec
from kubetune_contract.progress import ExitCode
from kubetune_dev.procs import free_port
from kubetune_dev.s3server import MinioServer
from kubetune_trainer import s3
from kubetune_trainer.checkpoint import MANIFEST, CheckpointInfo, CheckpointStore, sha256_file
from kubetune_trainer.errors import CorruptCheckpoint, RetriableError, UserError

MB = 1024 * 1024


def write_ckpt(d: Path, step: int, big: int = 1 * MB) -> Path:
    """A checkpoint-shaped directory whose content depends on the step."""
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(os.urandom(big))
    (d / "optimizer").mkdir()
    (d / "optimizer" / "state.pt").write_bytes(os.urandom(4096) + step.to_bytes(8, "big"))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def digests(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def new_store(minio: MinioServer, bucket: str, keep_last: int = 3, **kw) -> CheckpointStore:
    kw.setdefault("registry", CollectorRegistry())
    return CheckpointStore(f"s3://{bucket}/jobs/ns/job", minio.s3_spec(), keep_last, client=minio.client(), **kw)


def metric(registry: CollectorRegistry, name: str, labels: dict | None = None) -> float:
    v = registry.get_sample_value(name, labels or {})
    return 0.0 if v is None else v


# ------------------------------------------------------------------ pure: manifest validation
def test_manifest_rejects_unsafe_and_inconsistent_entries() -> None:
    good = {
        "format": "kubetune-checkpoint/v1",
        "step": 5,
        "time": "2026-11-22T00:00:00.000Z",
        "files": {"a.bin": {"size": 3, "sha256": "0" * 64}},
        "meta": {},
    }
    info = CheckpointInfo.from_manifest(json.dumps(good).encode(), uri="s3://b/p/step-000000005", expected_step=5)
    assert info.files["a.bin"].size == 3
    for patch, why in [
        ({"files": {"../evil": {"size": 1, "sha256": "0" * 64}}}, "unsafe"),
        ({"files": {"/etc/passwd": {"size": 1, "sha256": "0" * 64}}}, "unsafe"),
        ({"files": {"a": {"size": -1, "sha256": "0" * 64}}}, "valid size"),
        ({"files": {"a": {"size": 1, "sha256": "xyz"}}}, "valid sha256"),
        ({"files": {}}, "files is missing"),
        ({"step": 6}, "does not match"),
        ({"format": "other"}, "format"),
    ]:
        with pytest.raises(CorruptCheckpoint, match=why):
            CheckpointInfo.from_manifest(json.dumps({**good, **patch}).encode(), uri="s3://b/p", expected_step=5)
    with pytest.raises(CorruptCheckpoint, match="not valid JSON"):
        CheckpointInfo.from_manifest(b'{"format": "kubetune-chec', uri="s3://b/p", expected_step=5)


# ------------------------------------------------------------------------------- round trip
@pytest.mark.s3
def test_save_restore_round_trip(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    store = new_store(minio, minio_bucket)
    src = write_ckpt(tmp_path / "ckpt", 7, big=3 * MB)
    want = digests(src)
    fut = store.save_async(7, src, meta={"loss": 1.25, "epoch": 0.5})
    assert not src.exists(), "the store takes the directory over at once"
    info = fut.result(timeout=60)
    assert info.step == 7 and info.meta == {"loss": 1.25, "epoch": 0.5}
    assert info.uri == f"s3://{minio_bucket}/jobs/ns/job/checkpoints/step-000000007-a0"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", info.time)
    assert {k: e.sha256 for k, e in info.files.items()} == want
    assert store.last_durable() == info and store.wait() == info
    # the staging copy is gone once durable
    assert not list(tmp_path.glob(".ckpt.upload-*"))

    manifest = json.loads(s3.get_bytes(store.client, f"{info.uri}/{MANIFEST}"))
    assert manifest["step"] == 7 and manifest["totalBytes"] == info.total_bytes
    assert set(manifest["files"]) == set(want)

    fresh = new_store(minio, minio_bucket)
    got = fresh.restore_latest(tmp_path / "restored")
    assert got == info
    assert digests(tmp_path / "restored") == want
    assert fresh.last_durable() == info
    assert [c.step for c in fresh.list_committed()] == [7]


@pytest.mark.s3
def test_restore_with_nothing_there(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    store = new_store(minio, minio_bucket)
    assert store.restore_latest(tmp_path / "r") is None
    assert not (tmp_path / "r").exists()
    assert store.list_committed() == [] and store.wait() is None and store.last_durable() is None


@pytest.mark.s3
def test_restore_refuses_a_non_empty_destination(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        new_store(minio, minio_bucket).restore_latest(tmp_path / "r")


@pytest.mark.s3
def test_metrics_recorded(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    reg = CollectorRegistry()
    store = new_store(minio, minio_bucket, registry=reg)
    info = store.save_async(1, write_ckpt(tmp_path / "c", 1)).result(timeout=60)
    assert metric(reg, "kubetune_checkpoint_upload_bytes_total") == info.total_bytes
    assert metric(reg, "kubetune_checkpoint_save_seconds_count") == 1
    assert metric(reg, "kubetune_checkpoint_saves_total", {"result": "success"}) == 1
    assert metric(reg, "kubetune_checkpoint_last_durable_step") == 1
    store.restore_latest(tmp_path / "r")
    assert metric(reg, "kubetune_checkpoint_restore_seconds_count") == 1
    # a second store on the same (or the default) registry must not fail on re-registration
    new_store(minio, minio_bucket, registry=reg)
    new_store(minio, minio_bucket, registry=None)
    new_store(minio, minio_bucket, registry=None)


# ------------------------------------------------------------------- never read half a checkpoint
@pytest.mark.s3
def test_half_uploaded_newest_is_ignored(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    store = new_store(minio, minio_bucket)
    good = store.save_async(10, write_ckpt(tmp_path / "c10", 10)).result(timeout=60)
    # step 20: the data went up, the process died before the manifest
    s3.upload_dir(store.client, write_ckpt(tmp_path / "c20", 20), store.step_uri(20))
    assert [c.step for c in store.list_committed()] == [10]
    got = new_store(minio, minio_bucket).restore_latest(tmp_path / "r")
    assert got is not None and got.step == 10 and got == good
    assert json.loads((tmp_path / "r" / "trainer_state.json").read_text())["global_step"] == 10


def _corrupt(store: CheckpointStore, info: CheckpointInfo, how: str) -> None:
    c, uri = store.client, s3.parse_s3_uri(info.uri)
    key = uri.join("adapter_model.safetensors")
    size = info.files["adapter_model.safetensors"].size
    if how == "overwritten":  # same size, different bytes: only the checksum can tell
        s3.put_bytes(c, key, os.urandom(size))
    elif how == "truncated":
        s3.put_bytes(c, key, s3.get_bytes(c, key)[: size // 2])
    elif how == "file-deleted":
        c.delete_object(Bucket=key.bucket, Key=key.key)
    elif how == "manifest-garbage":
        s3.put_bytes(c, uri.join(MANIFEST), b'{"format": "kubetune-checkpoint/v1", "st')
    else:
        raise AssertionError(how)


@pytest.mark.s3
@pytest.mark.parametrize("how", ["overwritten", "truncated", "file-deleted", "manifest-garbage"])
def test_corrupt_newest_falls_back_to_previous(
    minio: MinioServer, minio_bucket: str, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = new_store(minio, minio_bucket, keep_last=2)
    older = store.save_async(10, write_ckpt(tmp_path / "c10", 10)).result(timeout=60)
    newest = store.save_async(20, write_ckpt(tmp_path / "c20", 20)).result(timeout=60)
    _corrupt(store, newest, how)

    reg = CollectorRegistry()
    fresh = new_store(minio, minio_bucket, keep_last=2, registry=reg)
    caplog.set_level("INFO", logger="kubetune_trainer.checkpoint")
    got = fresh.restore_latest(tmp_path / "r")
    assert got == older
    assert json.loads((tmp_path / "r" / "trainer_state.json").read_text())["global_step"] == 10
    assert {k: sha256_file(tmp_path / "r" / k) for k in older.files} == {k: e.sha256 for k, e in older.files.items()}
    assert "step=20" in caplog.text and ("skipped" in caplog.text or "unreadable" in caplog.text)
    if how != "manifest-garbage":
        assert metric(reg, "kubetune_checkpoint_restore_fallbacks_total") == 1
    assert not list(tmp_path.glob(".r.restore-*")), "a failed verification leaves no partial directory"

    # Resuming from 10, the next save (15) prunes the bad 20 rather than the good 10.
    fresh.save_async(15, write_ckpt(tmp_path / "c15", 15)).result(timeout=60)
    assert [c.step for c in fresh.list_committed()] == [15, 10]
    assert s3.list_objects(fresh.client, fresh.step_uri(20)) == []


@pytest.mark.s3
def test_only_corrupt_checkpoints_gives_none(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    store = new_store(minio, minio_bucket)
    info = store.save_async(3, write_ckpt(tmp_path / "c", 3)).result(timeout=60)
    _corrupt(store, info, "overwritten")
    assert new_store(minio, minio_bucket).restore_latest(tmp_path / "r") is None
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------- pruning
@pytest.mark.s3
def test_keep_last_prunes_old_and_unfinished(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    store = new_store(minio, minio_bucket, keep_last=2)
    # an unfinished upload left behind by an earlier attempt
    s3.upload_dir(store.client, write_ckpt(tmp_path / "c0", 0), store.step_uri(1))
    for step in (2, 3, 4, 5):
        store.save_async(step, write_ckpt(tmp_path / f"c{step}", step)).result(timeout=60)
        assert store.list_committed()[0].step == step, "the newest is never pruned"
    assert [c.step for c in store.list_committed()] == [5, 4]
    left = {o.key.split("/")[4] for o in s3.list_objects(store.client, store.root)}
    assert left == {"step-000000005-a0", "step-000000004-a0"}


@pytest.mark.s3
def test_resave_of_a_step_replaces_leftovers(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    store = new_store(minio, minio_bucket)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "stale.bin").write_bytes(b"x" * 10)
    s3.upload_dir(store.client, junk, store.step_uri(30))
    info = store.save_async(30, write_ckpt(tmp_path / "c", 30)).result(timeout=60)
    keys = {o.key.rsplit("/", 1)[-1] for o in s3.list_objects(store.client, info.uri)}
    assert "stale.bin" not in keys and MANIFEST in keys


# ----------------------------------------------------------------------------- fail fast
@pytest.mark.s3
def test_missing_bucket_is_a_user_error(minio: MinioServer, tmp_path: Path) -> None:
    store = CheckpointStore(
        "s3://no-such-bucket-kt/jobs/ns/job", minio.s3_spec(), 3, client=minio.client(), registry=CollectorRegistry()
    )
    with pytest.raises(UserError) as ei:
        store.check_access()
    msg = str(ei.value)
    assert "checkpoints.uri" in msg and "'no-such-bucket-kt' does not exist" in msg and minio.endpoint in msg
    assert ei.value.exit_code == ExitCode.USER_ERROR
    # and the same from a save, surfaced through the future
    fut = store.save_async(1, write_ckpt(tmp_path / "c", 1))
    with pytest.raises(UserError, match="no-such-bucket-kt"):
        fut.result(timeout=60)
    assert store.last_durable() is None


@pytest.mark.s3
@pytest.mark.parametrize("bad", ["access-key", "secret-key"])
def test_bad_credentials_are_a_user_error(minio: MinioServer, minio_bucket: str, bad: str) -> None:
    ak = "WRONGKEY1234" if bad == "access-key" else minio.access_key
    sk = minio.secret_key if bad == "access-key" else "wrong-secret-key-123"
    client = s3.make_client(minio.s3_spec(), access_key=ak, secret_key=sk)
    store = CheckpointStore(f"s3://{minio_bucket}/jobs/ns/job", None, 3, client=client, registry=CollectorRegistry())
    with pytest.raises(UserError) as ei:
        store.check_access()
    msg = str(ei.value)
    assert minio_bucket in msg and minio.endpoint in msg
    assert ("InvalidAccessKeyId" if bad == "access-key" else "SignatureDoesNotMatch") in msg
    assert ei.value.exit_code == ExitCode.USER_ERROR


@pytest.mark.s3
def test_credentials_from_the_environment(
    minio: MinioServer, minio_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in minio.env().items():
        monkeypatch.setenv(k, v)
    s3.check_access(s3.make_client(minio.s3_spec()), f"s3://{minio_bucket}/x", write=True)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-key")
    with pytest.raises(UserError, match="SignatureDoesNotMatch"):
        s3.check_access(s3.make_client(minio.s3_spec()), f"s3://{minio_bucket}/x")


def test_unreachable_endpoint(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = s3.make_client(
        S3Spec(endpoint=endpoint), access_key="a", secret_key="b", max_attempts=2, connect_timeout=1
    )
    store = CheckpointStore("s3://bkt/jobs/ns/job", None, 3, client=client, registry=CollectorRegistry())
    t0 = time.monotonic()
    with pytest.raises(UserError) as ei:
        store.check_access()
    assert endpoint in str(ei.value) and "s3.endpoint" in str(ei.value)
    # past the start-up check the same failure is infrastructure: retriable
    with pytest.raises(RetriableError, match="cannot reach"):
        store.list_committed()
    assert time.monotonic() - t0 < 30


# ----------------------------------------------------------------- background upload, SIGTERM
@pytest.mark.s3
def test_sigterm_wait_makes_the_in_flight_upload_durable(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    store = new_store(minio, minio_bucket)
    store.save_async(1, write_ckpt(tmp_path / "c1", 1)).result(timeout=60)
    seen: dict = {}

    def on_sigterm(signum, frame):  # what the trainer does: make the last save durable, then exit
        seen["info"] = store.wait(timeout=120)

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        t0 = time.monotonic()
        fut = store.save_async(2, write_ckpt(tmp_path / "c2", 2, big=48 * MB))
        blocked = time.monotonic() - t0
        assert store.in_flight or fut.done()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary of the main thread
    finally:
        signal.signal(signal.SIGTERM, old)
    info = seen["info"]
    assert info is not None and info.step == 2 and fut.done()
    assert store.last_durable() == info
    assert new_store(minio, minio_bucket).list_committed()[0].step == 2
    assert blocked < 5, f"save_async blocked {blocked:.1f}s: the upload must run in the background"


@pytest.mark.s3
def test_wait_timeout_and_backpressure(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    store = new_store(minio, minio_bucket, transfer=s3.transfer_config(max_concurrency=1, chunk_bytes=5 * MB))
    first = store.save_async(1, write_ckpt(tmp_path / "c1", 1, big=64 * MB))
    with pytest.raises(TimeoutError):
        store.wait(timeout=0.001)
    # a second save waits for the first: at most one upload in flight, committed in order
    second = store.save_async(2, write_ckpt(tmp_path / "c2", 2))
    assert first.done()
    assert store.wait(timeout=60).step == 2 and second.result().step == 2


# ---------------------------------------------------------------------------- transfers
@pytest.mark.s3
def test_concurrent_multipart_upload_of_a_big_file(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    data = os.urandom(40 * MB + 123)
    big.write_bytes(data)
    client = minio.client()
    cfg = s3.transfer_config(max_concurrency=4, chunk_bytes=8 * MB)
    n = s3.upload_file(client, big, f"s3://{minio_bucket}/m/big.bin", config=cfg)
    assert n == len(data)
    meta = s3.head(client, f"s3://{minio_bucket}/m/big.bin")
    assert meta is not None and meta.size == len(data)
    assert meta.etag.endswith("-6"), f"expected a 6-part multipart ETag, got {meta.etag}"
    s3.download_file(client, f"s3://{minio_bucket}/m/big.bin", tmp_path / "back.bin", config=cfg)
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).digest() == hashlib.sha256(data).digest()


@pytest.mark.s3
def test_download_prefix_of_a_model(minio: MinioServer, minio_bucket: str, tmp_path: Path) -> None:
    client = minio.client()
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "model-00001-of-00002.safetensors").write_bytes(os.urandom(2 * MB))
    (src / "model-00002-of-00002.safetensors").write_bytes(os.urandom(MB))
    (src / "sub" / "tokenizer.json").write_text("{}")
    s3.upload_dir(client, src, f"s3://{minio_bucket}/models/tiny")
    s3.upload_dir(client, src, f"s3://{minio_bucket}/models/tiny-2")  # a sibling sharing the name prefix
    got = s3.download_prefix(client, f"s3://{minio_bucket}/models/tiny", tmp_path / "dl")
    assert len(got) == 4 and digests(tmp_path / "dl") == digests(src)
    one = s3.download_prefix(client, f"s3://{minio_bucket}/models/tiny/config.json", tmp_path / "one")
    assert one == [tmp_path / "one" / "config.json"]
    with pytest.raises(s3.S3NotFound, match="no objects under"):
        s3.download_prefix(client, f"s3://{minio_bucket}/models/nope", tmp_path / "x", field="baseModel.uri")
    assert s3.list_dirs(client, f"s3://{minio_bucket}/models") == ["tiny", "tiny-2"]
    assert s3.delete_prefix(client, f"s3://{minio_bucket}/models/tiny") == 4
    assert s3.list_dirs(client, f"s3://{minio_bucket}/models") == ["tiny-2"]
