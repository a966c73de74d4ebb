"""S3 for the trainer: s3:// URIs, a client built from `S3Spec`, fail-fast access checks, and
concurrent (multipart) transfers of files and prefixes. Works with AWS, MinIO and other
S3-compatible stores.

Retries: botocore's "standard" mode retries every request on 5xx, throttling and connection
errors with exponential backoff and jitter (`max_attempts` per request); s3transfer re-reads
interrupted download streams. What still fails is translated here (`translate_error`) into
`RetriableError` (infrastructure) or `UserError` (missing bucket, bad credentials, denied), so
the trainer exits with the code the operator expects.

Kept light: boto3 only, no torch.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions as bce
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config

from kubetune_contract import envvars, uris
from kubetune_contract.config import S3Spec
from kubetune_contract.uris import S3_SCHEME as SCHEME
from kubetune_contract.uris import S3Uri

from .errors import KubetuneError, RetriableError, UserError

if TYPE_CHECKING:  # pragma: no cover
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

log = logging.getLogger(__name__)

MB = 1024 * 1024
_DELETE_BATCH = 1000  # DeleteObjects limit

# Network-level failures: worth retrying, never the user's fault (except in check_access).
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    bce.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, SSLError, ProxyConnectionError
    bce.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    bce.IncompleteReadError,
    ConnectionError,  # the builtin one, from sockets under a stream read
    TimeoutError,
)
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "XMinioServerNotInitialized",
    "XMinioStorageFull",
}


class S3UriError(UserError, uris.S3UriError):
    """A malformed s3:// URI (a user error: the trainer exits 2)."""


class S3NotFound(UserError):
    """The object or prefix does not exist (a user error when it is their model or dataset)."""


class S3PreconditionFailed(RetriableError):
    """A conditional write lost (If-None-Match: the object exists; If-Match: it changed)."""


def parse_s3_uri(uri: str, *, field: str | None = None) -> S3Uri:
    """Parse `s3://bucket[/key]` (the contract's rule); raise S3UriError naming the field."""
    return uris.parse_s3_uri(uri, field=field, error=S3UriError)


def _as_uri(uri: str | S3Uri, field: str | None = None) -> S3Uri:
    return uri if isinstance(uri, S3Uri) else parse_s3_uri(uri, field=field)


# ------------------------------------------------------------------------------------- client
def make_client(
    spec: S3Spec | None = None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    max_attempts: int = 5,
    max_pool_connections: int = 32,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> S3Client:
    """A boto3 S3 client for `spec` (endpoint, region, addressing style).

    Credentials: explicit `access_key`/`secret_key`, else boto3's chain, which reads the
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY the operator sets from the user's Secret, or the
    pod's ambient identity (IRSA, instance role).
    """
    spec = spec or S3Spec()
    cfg = Config(
        region_name=spec.region,
        signature_version="s3v4",
        s3={"addressing_style": "path" if spec.force_path_style else "auto"},
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    # One session per client: boto3's default session is not safe to share across threads.
    session = boto3.session.Session(
        aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=spec.region
    )
    return session.client("s3", endpoint_url=spec.endpoint, config=cfg)


def endpoint_of(client: S3Client) -> str:
    return str(client.meta.endpoint_url)


def transfer_config(*, max_concurrency: int = 8, chunk_bytes: int = 16 * MB) -> TransferConfig:
    """Multipart above `chunk_bytes`, `max_concurrency` parallel part/file requests."""
    return TransferConfig(
        multipart_threshold=chunk_bytes,
        multipart_chunksize=chunk_bytes,
        max_concurrency=max_concurrency,
        use_threads=True,
        preferred_transfer_client="classic",  # deterministic: never the optional CRT client
    )


# ------------------------------------------------------------------------------------- errors
def _error_code(exc: BaseException) -> tuple[str, int | None, str]:
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {}) or {}
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(err.get("Code", "")), status, str(err.get("Message", "") or "")
    return "", None, ""


def _root_cause(exc: BaseException) -> BaseException:
    # s3transfer wraps exhausted download retries; look at what actually happened.
    last = getattr(exc, "last_exception", None)
    return last if isinstance(last, BaseException) else exc


def _key_hint(client: S3Client) -> str:
    try:
        creds = client._request_signer._credentials  # noqa: SLF001 - only to name the key in errors
        key = creds.access_key if creds else None
    except AttributeError:
        key = None
    return f" {key[:4]}…" if key else ""


def translate_error(
    exc: BaseException,
    *,
    client: S3Client | None,
    op: str,
    target: str | S3Uri,
    field: str | None = None,
    unreachable_is_user_error: bool = False,
) -> KubetuneError:
    """Map a boto3/botocore failure to UserError or RetriableError with an actionable message."""
    if isinstance(exc, KubetuneError):
        return exc
    exc = _root_cause(exc)
    endpoint = endpoint_of(client) if client is not None else "S3"
    target_s = str(target)
    bucket = target.bucket if isinstance(target, S3Uri) else target_s.removeprefix(SCHEME).split("/")[0]
    where = f"{field}: " if field else ""
    code, status, msg = _error_code(exc)

    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)):
        return UserError(
            f"{where}no usable S3 credentials for {target_s}: set {envvars.S3_ACCESS_KEY} and "
            f"{envvars.S3_SECRET_KEY} (the job's s3.credentialsSecret) or give the pod an identity ({exc})"
        )
    if isinstance(exc, _CONNECTION_ERRORS):
        text = f"{where}cannot reach the S3 endpoint {endpoint} ({op} {target_s}): {exc}"
        if unreachable_is_user_error:
            return UserError(f"{text}; check s3.endpoint and that the store is up and reachable from the pod")
        return RetriableError(f"{text}; gave up after retries")
    if code in ("NoSuchBucket",) or (op in ("head_bucket",) and status == 404):
        return UserError(
            f"{where}S3 bucket {bucket!r} does not exist at {endpoint}; create it or fix the URI {target_s!r}"
        )
    if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
        return S3PreconditionFailed(f"{where}{target_s}: the conditional write lost ({code or status})")
    if code in ("NoSuchKey", "NotFound") or status == 404:
        return S3NotFound(f"{where}{target_s} does not exist at {endpoint}")
    if code == "InvalidAccessKeyId":
        return UserError(
            f"{where}S3 at {endpoint} rejected the access key id{_key_hint(client) if client else ''} "
            f"(InvalidAccessKeyId) for bucket {bucket!r}: check {envvars.S3_ACCESS_KEY} in the credentials Secret"
        )
    if code == "SignatureDoesNotMatch":
        return UserError(
            f"{where}S3 at {endpoint} rejected the signature (SignatureDoesNotMatch) for bucket "
            f"{bucket!r}: the secret key does not match the access key; check {envvars.S3_SECRET_KEY} "
            "in the credentials Secret"
        )
    if (
        code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException")
        or status == 301
    ):
        return UserError(
            f"{where}bucket {bucket!r} is not in the configured region at {endpoint} ({code or status}): "
            f"set s3.region to the bucket's region{': ' + msg if msg else ''}"
        )
    if code in ("AccessDenied", "AllAccessDisabled", "InvalidToken", "ExpiredToken") or status == 403:
        return UserError(
            f"{where}access denied ({code or 403}) to {target_s} at {endpoint} during {op}: the "
            "credentials need s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on it"
        )
    if code == "InvalidBucketName":
        return UserError(f"{where}invalid bucket name {bucket!r} ({msg or code})")
    if code in _TRANSIENT_CODES or (status is not None and status >= 500):
        return RetriableError(
            f"{where}S3 at {endpoint} kept failing {op} {target_s} ({code or status}: {msg}); gave up after retries"
        )
    if isinstance(exc, bce.ClientError) and status is not None and 400 <= status < 500:
        return UserError(f"{where}S3 at {endpoint} refused {op} {target_s}: {code or status}: {msg}")
    return RetriableError(f"{where}S3 {op} {target_s} at {endpoint} failed: {type(exc).__name__}: {exc}")


def _call(client: S3Client, op: str, target: str | S3Uri, fn, *args, field: str | None = None, **kw):
    try:
        return fn(*args, **kw)
    except KubetuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated, chained
        raise translate_error(exc, client=client, op=op, target=target, field=field) from exc


# ------------------------------------------------------------------------------- access check
def check_access(client: S3Client, uri: str | S3Uri, *, field: str | None = None, write: bool = False) -> None:
    """Fail fast (UserError) when the bucket is missing, the credentials are wrong, access is
    denied or the endpoint cannot be reached. With `write`, also put and delete a probe object
    under the prefix, so a read-only key is found before hours of training, not at the first
    checkpoint."""
    u = uri if isinstance(uri, S3Uri) else parse_s3_uri(uri if uri.startswith(SCHEME) else SCHEME + uri, field=field)

    def attempt(op: str, fn, **kw):
        try:
            return fn(**kw)
        except Exception as exc:  # noqa: BLE001
            raise translate_error(
                exc, client=client, op=op, target=u, field=field, unreachable_is_user_error=True
            ) from exc

    # ListObjectsV2 rather than HeadBucket: its error body says *why* (InvalidAccessKeyId vs
    # SignatureDoesNotMatch vs AccessDenied); HeadBucket only returns a bare 403.
    attempt("list_objects_v2", client.list_objects_v2, Bucket=u.bucket, Prefix=u.dir_prefix, MaxKeys=1)
    if write:
        probe = u.join(f".kubetune-access-check-{uuid.uuid4().hex}")
        attempt("put_object", client.put_object, Bucket=u.bucket, Key=probe.key, Body=b"")
        attempt("delete_object", client.delete_object, Bucket=u.bucket, Key=probe.key)


# ------------------------------------------------------------------------------------ objects
@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: str  # RFC 3339

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name


def iter_objects(client: S3Client, uri: str | S3Uri, *, as_dir: bool = True) -> Iterator[ObjectInfo]:
    """Every object below `uri` (recursively). `as_dir` lists `key/` so siblings sharing a name
    prefix (`step-1` vs `step-10`) are not included."""
    u = _as_uri(uri)
    prefix = u.dir_prefix if as_dir else u.key
    paginator = client.get_paginator("list_objects_v2")
    pages = _call(client, "list_objects_v2", u, lambda: iter(paginator.paginate(Bucket=u.bucket, Prefix=prefix)))
    while True:
        page = _call(client, "list_objects_v2", u, next, pages, None)
        if page is None:
            return
        for o in page.get("Contents", []) or []:
            yield ObjectInfo(
                key=o["Key"],
                size=int(o["Size"]),
                etag=str(o.get("ETag", "")).strip('"'),
                last_modified=o["LastModified"].isoformat() if o.get("LastModified") else "",
            )


def list_objects(client: S3Client, uri: str | S3Uri, *, as_dir: bool = True) -> list[ObjectInfo]:
    return list(iter_objects(client, uri, as_dir=as_dir))


def list_dirs(client: S3Client, uri: str | S3Uri) -> list[str]:
    """Names of the "directories" directly below `uri` (common prefixes, without slashes), sorted."""
    u = _as_uri(uri)
    paginator = client.get_paginator("list_objects_v2")
    out: list[str] = []

    def collect() -> None:
        for page in paginator.paginate(Bucket=u.bucket, Prefix=u.dir_prefix, Delimiter="/"):
            for p in page.get("CommonPrefixes", []) or []:
                out.append(p["Prefix"][len(u.dir_prefix) :].rstrip("/"))

    _call(client, "list_objects_v2", u, collect)
    return sorted(out)


def head(client: S3Client, uri: str | S3Uri) -> ObjectInfo | None:
    """The object's size and ETag, or None when it does not exist."""
    u = _as_uri(uri)
    try:
        r = _call(client, "head_object", u, client.head_object, Bucket=u.bucket, Key=u.key)
    except S3NotFound:
        return None
    lm = r.get("LastModified")
    return ObjectInfo(u.key, int(r["ContentLength"]), str(r.get("ETag", "")).strip('"'), lm.isoformat() if lm else "")


def get_bytes(client: S3Client, uri: str | S3Uri) -> bytes:
    """A small object's content (manifests, configs). Raises S3NotFound when missing."""
    u = _as_uri(uri)

    def fetch() -> bytes:
        return client.get_object(Bucket=u.bucket, Key=u.key)["Body"].read()

    return _call(client, "get_object", u, fetch)


def put_bytes(
    client: S3Client,
    uri: str | S3Uri,
    data: bytes,
    *,
    content_type: str = "application/octet-stream",
    if_none_match: bool = False,
    if_match: str | None = None,
) -> str:
    """Write a small object; returns its ETag. if_none_match: only when it does not exist yet;
    if_match: only while its ETag is this one (S3 conditional writes: AWS since 2024, MinIO;
    a loser gets S3PreconditionFailed)."""
    u = _as_uri(uri)
    cond: dict[str, str] = {}
    if if_none_match:
        cond["IfNoneMatch"] = "*"
    if if_match is not None:
        cond["IfMatch"] = f'"{if_match.strip(chr(34))}"'
    put = client.put_object
    r = _call(client, "put_object", u, put, Bucket=u.bucket, Key=u.key, Body=data, ContentType=content_type, **cond)
    return str((r or {}).get("ETag", "")).strip('"')


def get_bytes_etag(client: S3Client, uri: str | S3Uri) -> tuple[bytes, str]:
    """A small object's content and ETag. Raises S3NotFound when missing."""
    u = _as_uri(uri)

    def fetch() -> tuple[bytes, str]:
        r = client.get_object(Bucket=u.bucket, Key=u.key)
        return r["Body"].read(), str(r.get("ETag", "")).strip('"')

    return _call(client, "get_object", u, fetch)


def delete_keys(client: S3Client, bucket: str, keys: Iterable[str]) -> int:
    """Delete keys in batches of 1000; returns how many were deleted. Missing keys are fine."""
    keys = list(keys)
    for i in range(0, len(keys), _DELETE_BATCH):
        batch = keys[i : i + _DELETE_BATCH]
        target = f"{SCHEME}{bucket}/{batch[0]}"
        r = _call(
            client,
            "delete_objects",
            target,
            client.delete_objects,
            Bucket=bucket,
            Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
        )
        errs = r.get("Errors") or []
        if errs:
            e = errs[0]
            fake = bce.ClientError(
                {"Error": {"Code": e.get("Code", ""), "Message": e.get("Message", "")}}, "DeleteObjects"
            )
            raise translate_error(
                fake, client=client, op="delete_objects", target=f"{SCHEME}{bucket}/{e.get('Key', '')}"
            )
    return len(keys)


def delete_prefix(client: S3Client, uri: str | S3Uri) -> int:
    """Delete every object below `uri` (as a directory)."""
    u = _as_uri(uri)
    return delete_keys(client, u.bucket, [o.key for o in iter_objects(client, u)])


# ---------------------------------------------------------------------------------- transfers
def _wait_all(futures: list[tuple[Any, str]], client: S3Client, op: str) -> None:
    """Wait for every transfer; raise the first failure, translated (the manager cancels the rest)."""
    first: tuple[BaseException, str] | None = None
    for fut, target in futures:
        try:
            fut.result()
        except Exception as exc:  # noqa: BLE001
            if first is None:
                first = (exc, target)
    if first is not None:
        err, failed_target = first
        raise translate_error(err, client=client, op=op, target=failed_target) from err


def upload_files(
    client: S3Client,
    files: dict[str, Path],
    uri: str | S3Uri,
    *,
    config: TransferConfig | None = None,
) -> int:
    """Upload {relative key: local path} below `uri`, all files and their parts concurrently
    (multipart above the threshold). Returns the bytes sent."""
    u = _as_uri(uri)
    cfg = config or transfer_config()
    total = 0
    futures: list[tuple[Any, str]] = []
    with create_transfer_manager(client, cfg) as tm:
        for rel, path in files.items():
            dst = u.join(rel)
            total += path.stat().st_size
            futures.append((tm.upload(str(path), dst.bucket, dst.key), str(dst)))
        _wait_all(futures, client, "upload")
    return total


def upload_file(client: S3Client, path: Path, uri: str | S3Uri, *, config: TransferConfig | None = None) -> int:
    """Upload one file to exactly `uri` (multipart and concurrent above the threshold)."""
    u = _as_uri(uri)
    parent, name = u.key.rpartition("/")[0], u.name
    if not name:
        raise S3UriError(f"{u}: an object URI needs a key, not just a bucket")
    return upload_files(client, {name: Path(path)}, S3Uri(u.bucket, parent), config=config)


def local_files(local_dir: Path) -> dict[str, Path]:
    """{posix relative path: path} of every regular file below `local_dir`, sorted."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{local_dir} is not a directory")
    out = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
    return out


def upload_dir(
    client: S3Client, local_dir: Path, uri: str | S3Uri, *, config: TransferConfig | None = None
) -> dict[str, int]:
    """Upload a directory tree below `uri`; returns {relative path: size}."""
    files = local_files(local_dir)
    upload_files(client, files, uri, config=config)
    return {rel: p.stat().st_size for rel, p in files.items()}


def _safe_rel(rel: str, source: str) -> PurePosixPath:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or any(part in ("..", "") for part in rel.split("/")) or "\\" in rel:
        raise UserError(f"refusing to write {source!r} to local disk: its relative path {rel!r} is unsafe")
    return p


def download_files(
    client: S3Client,
    keys: Mapping[str, str | S3Uri],
    dest: Path,
    *,
    config: TransferConfig | None = None,
) -> int:
    """Download {relative path: s3 uri} into `dest`, concurrently; returns the bytes received.
    Each file appears atomically (s3transfer writes a temp file, then renames)."""
    dest = Path(dest)
    cfg = config or transfer_config()
    futures: list[tuple[Any, str]] = []
    with create_transfer_manager(client, cfg) as tm:
        for rel, src in keys.items():
            s = _as_uri(src)
            target = dest.joinpath(*_safe_rel(rel, str(s)).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            futures.append((tm.download(s.bucket, s.key, str(target)), str(s)))
        _wait_all(futures, client, "download")
    return sum(dest.joinpath(rel).stat().st_size for rel in keys)


def download_file(client: S3Client, uri: str | S3Uri, path: Path, *, config: TransferConfig | None = None) -> int:
    path = Path(path)
    return download_files(client, {path.name: uri}, path.parent, config=config)


def download_prefix(
    client: S3Client,
    uri: str | S3Uri,
    dest: Path,
    *,
    config: TransferConfig | None = None,
    allow_single_object: bool = True,
    field: str | None = None,
) -> list[Path]:
    """Download everything below the prefix `uri` into `dest` (concurrently, multipart for big
    files), keeping relative paths; e.g. a saved model under s3://bucket/models/llama.
    With `allow_single_object`, a URI naming one object downloads it as dest/<name>.
    Raises S3NotFound when there is nothing there."""
    u = _as_uri(uri, field)
    objs = [o for o in iter_objects(client, u) if not o.key.endswith("/")]  # skip directory markers
    if objs:
        keys = {o.key[len(u.dir_prefix) :]: S3Uri(u.bucket, o.key) for o in objs}
    elif allow_single_object and u.key and head(client, u) is not None:
        keys = {u.name: u}
    else:
        where = f"{field}: " if field else ""
        raise S3NotFound(f"{where}no objects under {u} at {endpoint_of(client)}")
    download_files(client, keys, dest, config=config)
    return [Path(dest).joinpath(rel) for rel in keys]
