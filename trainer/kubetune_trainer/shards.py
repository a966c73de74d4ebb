"""One checkpoint written by several ranks (DeepSpeed: each rank its own ZeRO shards, in its pod).

Every rank uploads its own files into the same step directory, then writes its *part*,
`_ranks/rank-<r>.json` (its files with size and sha256): the part is that rank's "my uploads are
durable". Rank 0's uploader waits until every rank's part is there (the barrier, through S3, so
no collective runs on an upload thread), checks that the parts do not overlap, and commits the one
`MANIFEST.json` over all ranks' files. A checkpoint with a missing or half-uploaded rank therefore
has no manifest and is never read; restore downloads every rank's files the manifest lists and
verifies each. Rank 0 clears the step directory before any rank writes (leftovers of an earlier
attempt at the same step), so a part found there belongs to this save.

Kept light: no torch import.
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import s3 as s3mod
from .errors import RetriableError

PARTS_DIR = "_ranks"
PART_FORMAT = "kubetune-checkpoint-part/v1"
POLL_SECONDS = 0.2


def part_rel(rank: int) -> str:
    return f"{PARTS_DIR}/rank-{rank:05d}.json"


def part_bytes(step: int, rank: int, files: dict[str, Any]) -> bytes:
    """files: relative path -> checkpoint.FileEntry."""
    doc = {
        "format": PART_FORMAT,
        "step": step,
        "rank": rank,
        "files": {k: {"size": e.size, "sha256": e.sha256} for k, e in sorted(files.items())},
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def _parse(data: bytes, *, step: int, rank: int, where: str) -> dict[str, tuple[int, str]]:
    try:
        doc = json.loads(data)
        if doc.get("format") != PART_FORMAT or doc.get("step") != step or doc.get("rank") != rank:
            raise ValueError(f"format/step/rank {doc.get('format')!r}/{doc.get('step')!r}/{doc.get('rank')!r}")
        return {rel: (int(e["size"]), str(e["sha256"])) for rel, e in doc["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RetriableError(f"{where}: not a valid part of step {step} for rank {rank} ({exc})") from None


def await_parts(
    client: Any, uri: s3mod.S3Uri, *, step: int, world: int, timeout: float
) -> dict[int, dict[str, tuple[int, str]]]:
    """Ranks 1..world-1's parts of this step ({rank: {rel: (size, sha256)}}), once all are there;
    RetriableError when one is still missing after timeout seconds."""
    deadline = time.monotonic() + timeout
    out: dict[int, dict[str, tuple[int, str]]] = {}
    for rank in range(1, world):
        where = uri.join(part_rel(rank))
        while True:
            try:
                out[rank] = _parse(s3mod.get_bytes(client, where), step=step, rank=rank, where=str(where))
                break
            except s3mod.S3NotFound:
                if time.monotonic() > deadline:
                    raise RetriableError(
                        f"checkpoint step {step}: rank {rank} did not upload its shards within {timeout:.0f}s; "
                        "not committed"
                    ) from None
                time.sleep(POLL_SECONDS)
    return out
