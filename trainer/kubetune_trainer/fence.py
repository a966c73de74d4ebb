"""Fencing: which attempt of a job may write under its prefix.

`<job prefix>/owner.json` names the attempt that owns the prefix (`{"format", "attempt", "podUID",
"since"}`; the token is the attempt number and rank 0's pod UID). Rank 0 of every attempt claims it
at start, before it restores: a conditional write (If-None-Match when there is none, If-Match on
the ETag it read otherwise; MinIO and AWS S3 honour both), never taking it from a newer attempt.
Every writer of the attempt (rank 0's uploader, each ZeRO rank) reads it before each commit, clear
and prune, and before the output upload, and stops (`Fenced`) when another attempt owns it. An
older attempt kept running (pod object gone, container alive: a zombie) therefore gives up at its
next checkpoint without committing. Each attempt writes step directories of its own
(`step-<n>-a<attempt>`, `manifest`) and prunes only checkpoints of attempts up to its own, so even
a write that slips between a check and its commit cannot delete or overwrite a newer attempt's
checkpoints.

Kept light: no torch import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import logs
from . import s3 as s3mod
from .errors import RetriableError

OWNER_FILE = "owner.json"
FORMAT = "kubetune-owner/v1"
_CLAIM_TRIES = 8


class Fenced(RetriableError):
    """A newer attempt owns the job's prefix: this writer stops without writing. (Its pod is gone
    or superseded, so the exit code only matters for logs.)"""


@dataclass(frozen=True)
class AttemptToken:
    """Who writes: the operator's attempt number and rank 0's pod UID (empty outside a pod)."""

    attempt: int
    pod_uid: str = ""

    def __str__(self) -> str:
        return f"attempt {self.attempt} (pod {self.pod_uid or '-'})"

    def to_bytes(self, since: str) -> bytes:
        doc = {"format": FORMAT, "attempt": self.attempt, "podUID": self.pod_uid, "since": since}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> AttemptToken | None:
        """The owner in a marker, None when it is not one (then anyone may claim it)."""
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT or not isinstance(doc.get("attempt"), int):
                return None
            return cls(int(doc["attempt"]), str(doc.get("podUID") or ""))
        except (ValueError, AttributeError, UnicodeDecodeError):
            return None


def may_claim(current: AttemptToken | None, me: AttemptToken) -> bool:
    """Whether `me` may take the prefix from `current`: never from a newer attempt. The same
    attempt number from another pod is a replacement pod of that attempt: the later one wins."""
    return current is None or current.attempt <= me.attempt


class Fence:
    """The owner marker of one job prefix, for one attempt's token."""

    def __init__(self, client: Any, prefix_uri: str, token: AttemptToken) -> None:
        self.client, self.token = client, token
        self.prefix = s3mod.parse_s3_uri(prefix_uri, field="checkpoints.uri")
        self.uri = self.prefix.join(OWNER_FILE)

    def _read(self) -> tuple[AttemptToken | None, str | None]:
        try:
            data, etag = s3mod.get_bytes_etag(self.client, self.uri)
        except s3mod.S3NotFound:
            return None, None
        return AttemptToken.parse(data), etag

    def claim(self, since: str) -> AttemptToken | None:
        """Make this attempt the owner; returns the previous owner. Fenced when a newer one owns it."""
        for _ in range(_CLAIM_TRIES):
            current, etag = self._read()
            if current == self.token:
                return current
            if not may_claim(current, self.token):
                raise self._fenced("starting", current)
            try:
                body = self.token.to_bytes(since)
                if etag is None:
                    s3mod.put_bytes(self.client, self.uri, body, content_type="application/json", if_none_match=True)
                else:
                    s3mod.put_bytes(self.client, self.uri, body, content_type="application/json", if_match=etag)
            except s3mod.S3PreconditionFailed:
                continue  # another attempt wrote it between our read and write: look again
            logs.log("fence_claimed", owner=str(self.token), previous=str(current) if current else None)
            return current
        raise RetriableError(f"{self.uri}: could not claim the job's prefix (it kept changing)")

    def check(self, what: str) -> None:
        """Before a write that commits, clears or deletes: Fenced unless this attempt owns the prefix."""
        current, _ = self._read()
        if current != self.token:
            raise self._fenced(what, current)

    def _fenced(self, what: str, current: AttemptToken | None) -> Fenced:
        owner = str(current) if current else "no attempt (the owner marker is gone)"
        logs.log("fenced", "error", owner=owner, me=str(self.token), action=what, marker=str(self.uri))
        return Fenced(
            f"{what}: {owner} owns {self.prefix} now, not this {self.token}; this writer stops without "
            "writing (a newer attempt took over)"
        )
