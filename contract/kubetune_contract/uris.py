"""URI rules shared by the schema, the operator and the trainer: s3://, pvc:// and file paths,
and where each job's checkpoints and outputs live below the prefixes the user gives."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from .layout import PVC_MOUNT_ROOT

S3_SCHEME = "s3://"
PVC_SCHEME = "pvc://"
# S3 bucket naming rules (the subset every S3-compatible store accepts).
S3_BUCKET_PATTERN = r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]"
# The schema's pattern for s3:// fields (the API server checks it; parse_s3_uri says why not).
S3_URI_PATTERN = rf"^s3://{S3_BUCKET_PATTERN}(/.*)?$"
S3_MAX_KEY_BYTES = 1024

_BUCKET_RE = re.compile(rf"^{S3_BUCKET_PATTERN}$")
_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


class S3UriError(ValueError):
    """A malformed s3:// URI; the message names the field and the bad value."""


@dataclass(frozen=True)
class S3Uri:
    """A parsed s3://bucket/key. `key` has no leading slash and may be empty (the bucket root)."""

    bucket: str
    key: str = ""

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}" if self.key else f"{S3_SCHEME}{self.bucket}"

    def join(self, *parts: str) -> S3Uri:
        """Append path components (slashes between them are normalised)."""
        segs = [s for s in (self.key.strip("/"), *(p.strip("/") for p in parts)) if s]
        return S3Uri(self.bucket, "/".join(segs))

    @property
    def dir_prefix(self) -> str:
        """The key as a "directory" for listing: `a/b/` (so `a/bc` is not matched); '' at the root."""
        k = self.key.strip("/")
        return f"{k}/" if k else ""

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def parse_s3_uri(uri: str, *, field: str | None = None, error: type[S3UriError] = S3UriError) -> S3Uri:
    """Parse `s3://bucket[/key]`; raise `error` naming the field and the bad value."""

    def bad(reason: str) -> S3UriError:
        where = f"{field}: " if field else ""
        return error(f"{where}{uri!r} is not a valid S3 URI: {reason} (expected s3://bucket/prefix)")

    if not isinstance(uri, str):
        raise bad(f"expected a string, got {type(uri).__name__}")
    if uri != uri.strip() or any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise bad("it has leading/trailing whitespace or control characters")
    if not uri.startswith(S3_SCHEME):
        if uri.lower().startswith(S3_SCHEME):
            raise bad("the scheme must be lowercase 's3://'")
        if "://" in uri:
            raise bad(f"scheme {uri.split('://', 1)[0]!r} is not s3")
        raise bad("it does not start with s3://")
    rest = uri[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise bad("the bucket name is empty")
    if bucket != bucket.lower():
        raise bad(f"bucket {bucket!r} has uppercase letters; bucket names are lowercase")
    if not _BUCKET_RE.match(bucket):
        raise bad(
            f"bucket {bucket!r} must be 3-63 characters of a-z, 0-9, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        raise bad(f"bucket {bucket!r} has adjacent '.'/'-' characters")
    if _IPV4_RE.match(bucket):
        raise bad(f"bucket {bucket!r} looks like an IP address")
    if len(key.encode()) > S3_MAX_KEY_BYTES:
        raise bad(f"the key is longer than {S3_MAX_KEY_BYTES} bytes")
    return S3Uri(bucket, key)


def job_prefix(base_uri: str, namespace: str, name: str, uid: str | None = None) -> str:
    """A job's own prefix below a user-given one: `<base>/<namespace>/<name>/<uid>`. Readable by
    namespace and name; the UID keeps two incarnations of one name (deleted and re-applied) apart,
    so a new job never resumes, prunes or overwrites an old one's files. Attempts of one job share
    it. Without a uid: `<base>/<namespace>/<name>` (every incarnation of the name below it)."""
    base = f"{base_uri.rstrip('/')}/{namespace}/{name}"
    return f"{base}/{uid}" if uid else base


def pvc_claim(uri: str) -> str | None:
    """The PersistentVolumeClaim named by a pvc://claim/path URI, else None."""
    if not uri.startswith(PVC_SCHEME):
        return None
    claim = uri[len(PVC_SCHEME) :].split("/", 1)[0]
    return claim or None


def local_path_for_uri(uri: str, pvc_root: str = PVC_MOUNT_ROOT) -> str | None:
    """Where the trainer finds `uri` on its own filesystem, or None when it is not local.

    pvc://claim/a/b -> <pvc_root>/claim/a/b; file:///x -> /x; an absolute path stays itself;
    s3:// URIs and hub ids (org/name) -> None. Pure: no filesystem access.
    """
    if uri.startswith(PVC_SCHEME):
        claim = pvc_claim(uri)
        if claim is None:
            return None
        rest = uri[len(PVC_SCHEME) + len(claim) :].strip("/")
        parts = [p for p in rest.split("/") if p not in ("", ".")]
        if ".." in parts:
            return None  # never escape the claim's mount
        return "/".join([pvc_root.rstrip("/"), claim, *parts])
    if uri.startswith("file://"):
        return uri[len("file://") :] or None
    if uri.startswith("/"):
        return uri
    return None
