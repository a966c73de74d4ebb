"""One checkpoint's records: its directory name, its manifest (the commit point) and the files it
lists. Pure (no S3, no torch): the store (`checkpoint`) reads and writes them.

A step directory is `step-<9+ digit step>-a<attempt>`: each attempt of a job writes its own, so two
attempts that reach the same step never write into one directory, and a store prunes only
checkpoints of attempts up to its own (`fence`). Directories of the first layout,
`step-<step>`, still read (as attempt -1, e.g. through `checkpoints.resumeFrom`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune_contract.progress import CheckpointRef

from . import s3 as s3mod
from .errors import CorruptCheckpoint, UserError

MANIFEST = "MANIFEST.json"
FORMAT = "kubetune-checkpoint/v1"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR_RE = re.compile(r"^step-(\d{9,})(?:-a(\d+))?$")
LEGACY_ATTEMPT = -1  # a step directory without an attempt (the first layout)

Key = tuple[int, int]
"""(step, attempt): checkpoints order by it, newest last."""
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def step_dir_name(step: int, attempt: int = 0) -> str:
    if attempt == LEGACY_ATTEMPT:
        return f"step-{step:09d}"
    return f"step-{step:09d}-a{attempt}"


def parse_step_dir(name: str) -> Key | None:
    """(step, attempt) of a step directory's name, None when it is not one."""
    m = _STEP_DIR_RE.match(name)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)) if m.group(2) is not None else LEGACY_ATTEMPT


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sha256_file(path: Path, bufsize: int = 4 * s3mod.MB) -> str:
    """Streaming sha256 (large reads: hashlib drops the GIL, so several files hash in parallel)."""
    h = hashlib.sha256()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


# ------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint, as its manifest describes it."""

    step: int
    uri: str  # s3://bucket/<prefix>/checkpoints/step-000000123-a0
    time: str  # RFC 3339, when the manifest was written
    files: dict[str, FileEntry]
    meta: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0  # the attempt that wrote it (from the directory's name)

    @property
    def key(self) -> Key:
        return (self.step, self.attempt)

    @property
    def job_uid(self) -> str | None:
        """The UID of the job that wrote it (meta.job.uid; None in checkpoints of the first layout)."""
        job = self.meta.get("job")
        uid = job.get("uid") if isinstance(job, dict) else None
        return uid if isinstance(uid, str) and uid else None

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def to_ref(self) -> CheckpointRef:
        """For ProgressRecord.last_checkpoint."""
        return CheckpointRef(uri=self.uri, step=self.step, time=self.time)

    def manifest_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "step": self.step,
            "time": self.time,
            "totalBytes": self.total_bytes,
            "files": {k: {"size": e.size, "sha256": e.sha256} for k, e in sorted(self.files.items())},
            "meta": self.meta,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_manifest(cls, data: bytes, *, uri: str, expected_step: int, attempt: int = 0) -> CheckpointInfo:
        """Parse and validate a manifest; CorruptCheckpoint says what is wrong with it."""

        def bad(why: str) -> CorruptCheckpoint:
            return CorruptCheckpoint(f"{uri}/{MANIFEST}: {why}")

        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise bad("not a JSON object")
        if doc.get("format") != FORMAT:
            raise bad(f"format {doc.get('format')!r} is not {FORMAT!r}")
        step = doc.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step != expected_step:
            raise bad(f"step {step!r} does not match the directory's step {expected_step}")
        t = doc.get("time")
        if not isinstance(t, str) or not t:
            raise bad("time is missing")
        raw_files = doc.get("files")
        if not isinstance(raw_files, dict) or not raw_files:
            raise bad("files is missing or empty")
        files: dict[str, FileEntry] = {}
        for rel, e in raw_files.items():
            try:
                s3mod._safe_rel(rel, uri)  # never let a manifest write outside the restore dir
            except UserError as exc:
                raise bad(str(exc)) from None
            if rel == MANIFEST:
                raise bad("lists itself")
            if not isinstance(e, dict):
                raise bad(f"entry {rel!r} is not an object")
            size, digest = e.get("size"), e.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad(f"entry {rel!r} has no valid size")
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise bad(f"entry {rel!r} has no valid sha256")
            files[rel] = FileEntry(size, digest)
        meta = doc.get("meta", {})
        if not isinstance(meta, dict):
            raise bad("meta is not an object")
        return cls(step=step, uri=uri, time=t, files=files, meta=meta, attempt=attempt)
