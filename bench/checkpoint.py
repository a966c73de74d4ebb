"""Checkpoint save/restore against a real MinIO (started here unless --endpoint is given).

For a LoRA-sized (~50 MB) and a larger (~500 MB) checkpoint, measures:
  local save    writing the files to local disk (what torch.save/save_pretrained costs; the
                only part training has to wait for)
  blocked       how long save_async() then held the caller (staging rename, listing)
  upload        save_async() -> manifest committed (durable), and MB/s
  SIGTERM       wait() called right after a fresh save_async() -> durable
  restore       restore_latest(): list, download, sha256-verify, and MB/s

    python bench/checkpoint.py [--repeats 3] [--sizes 50,500] [--chunk-mb 16] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from kubetune_contract.config import S3Spec
from kubetune_dev.s3server import MinioServer
from kubetune_trainer import s3
from kubetune_trainer.checkpoint import CheckpointStore

MB = 1024 * 1024


def write_checkpoint(d: Path, total_mb: int, blob: bytes) -> float:
    """A checkpoint-shaped dir: weights in <=250 MB shards, optimizer state, small json. Returns seconds."""
    t0 = time.perf_counter()
    d.mkdir(parents=True)
    weights = int(total_mb * 0.66)
    shards = max(1, -(-weights // 250))
    per = weights * MB // shards
    for i in range(shards):
        with open(d / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            f.write(memoryview(blob)[:per])
            os.fsync(f.fileno())
    (d / "optimizer").mkdir()
    with open(d / "optimizer" / "optimizer.pt", "wb") as f:
        f.write(memoryview(blob)[: (total_mb - weights) * MB])
        os.fsync(f.fileno())
    (d / "trainer_state.json").write_text('{"global_step": 1}')
    return time.perf_counter() - t0


def run(store: CheckpointStore, work: Path, total_mb: int, repeats: int, blob: bytes) -> dict[str, list[float]]:
    r: dict[str, list[float]] = {k: [] for k in ("local", "blocked", "upload", "sigterm", "restore")}
    step = 0
    for i in range(repeats):
        # save + upload (the future's own durable time)
        step += 1
        d = work / f"ckpt-{step}"
        r["local"].append(write_checkpoint(d, total_mb, blob))
        t0 = time.perf_counter()
        fut = store.save_async(step, d)
        r["blocked"].append(time.perf_counter() - t0)
        fut.result()
        r["upload"].append(time.perf_counter() - t0)

        # SIGTERM right after a fresh save: how long until it is durable
        step += 1
        d = work / f"ckpt-{step}"
        write_checkpoint(d, total_mb, blob)
        store.save_async(step, d)
        t0 = time.perf_counter()
        store.wait()
        r["sigterm"].append(time.perf_counter() - t0)

        dest = work / f"restore-{i}"
        t0 = time.perf_counter()
        info = store.restore_latest(dest)
        r["restore"].append(time.perf_counter() - t0)
        assert info is not None and info.step == step
        shutil.rmtree(dest)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,500", help="checkpoint sizes in MB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-mb", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--endpoint", help="use this S3 endpoint (credentials from AWS_* env) instead of a local MinIO")
    ap.add_argument("--bucket", default="kubetune-bench")
    ap.add_argument("--workdir", help="local dir for the checkpoints (default: a temp dir)")
    args = ap.parse_args()

    server = None
    if args.endpoint:
        client = s3.make_client(S3Spec(endpoint=args.endpoint))
    else:
        server = MinioServer().start()
        client = server.client()
    try:
        try:
            client.create_bucket(Bucket=args.bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        work = Path(tempfile.mkdtemp(prefix="kubetune-bench-", dir=args.workdir))
        cfg = s3.transfer_config(max_concurrency=args.concurrency, chunk_bytes=args.chunk_mb * MB)
        sizes = [int(s) for s in args.sizes.split(",")]
        blob = os.urandom(max(sizes) * MB)  # incompressible
        print(
            f"# {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}, "
            f"chunk {args.chunk_mb} MiB x {args.concurrency} concurrent, median of {args.repeats}"
        )
        print(
            "| checkpoint | local save (blocks) | save_async blocks | upload to durable | upload MB/s "
            "| SIGTERM→durable | restore+verify | restore MB/s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for size in sizes:
            store = CheckpointStore(
                f"s3://{args.bucket}/bench/{size}mb-{int(time.time())}",
                None,
                keep_last=2,
                client=client,
                registry=CollectorRegistry(),
                transfer=cfg,
            )
            r = run(store, work / f"{size}", size, args.repeats, blob)
            med = {k: statistics.median(v) for k, v in r.items()}
            print(
                f"| {size} MB | {med['local']:.2f} s | {med['blocked'] * 1000:.0f} ms | {med['upload']:.2f} s "
                f"| {size / med['upload']:.0f} | {med['sigterm']:.2f} s | {med['restore']:.2f} s "
                f"| {size / med['restore']:.0f} |",
                flush=True,
            )
            store.close()
            s3.delete_prefix(client, store.root)
        shutil.rmtree(work, ignore_errors=True)
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
