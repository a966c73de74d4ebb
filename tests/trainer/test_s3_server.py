"""The S3 behaviours kubetune relies on, asserted against the real test server (the `minio`
fixture, whichever S3 implementation it runs): what the checkpoint store, the trainer's
transfers and the operator's fail-fast checks assume of any S3-compatible store."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bce
import pytest
from botocore import UNSIGNED
from botocore.config import Config

from kubetune_trainer import s3

pytestmark = pytest.mark.s3
MB = 1024 * 1024


def error_code(exc: pytest.ExceptionInfo[bce.ClientError]) -> tuple[str, int]:
    r = exc.value.response
    return r["Error"]["Code"], r["ResponseMetadata"]["HTTPStatusCode"]


def keys_and_prefixes(client: Any, bucket: str, **kw: Any) -> tuple[list[str], list[str]]:
    r = client.list_objects_v2(Bucket=bucket, **kw)
    return [o["Key"] for o in r.get("Contents", [])], [p["Prefix"] for p in r.get("CommonPrefixes", [])]


def test_concurrent_multipart_upload_with_16_mib_parts(minio: Any, minio_bucket: str, tmp_path: Path) -> None:
    data = os.urandom(40 * MB + 7)
    (tmp_path / "big.bin").write_bytes(data)
    client = minio.client()
    cfg = s3.transfer_config(max_concurrency=4)  # the trainer's default: 16 MiB parts
    s3.upload_file(client, tmp_path / "big.bin", f"s3://{minio_bucket}/m/big.bin", config=cfg)
    h = client.head_object(Bucket=minio_bucket, Key="m/big.bin")
    assert h["ContentLength"] == len(data)
    assert h["ETag"].strip('"').endswith("-3"), h["ETag"]  # 16 + 16 + 8 MiB
    s3.download_file(client, f"s3://{minio_bucket}/m/big.bin", tmp_path / "back.bin", config=cfg)
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_multipart_parts_uploaded_out_of_order(minio: Any, minio_bucket: str) -> None:
    client = minio.client()
    parts = [os.urandom(5 * MB), os.urandom(5 * MB), b"tail"]
    up = client.create_multipart_upload(Bucket=minio_bucket, Key="mp/obj")["UploadId"]
    etags: dict[int, str] = {}
    for n in (3, 1, 2):
        etags[n] = client.upload_part(Bucket=minio_bucket, Key="mp/obj", UploadId=up, PartNumber=n, Body=parts[n - 1])[
            "ETag"
        ]
    # an unfinished upload is not an object
    assert keys_and_prefixes(client, minio_bucket, Prefix="mp/")[0] == []
    client.complete_multipart_upload(
        Bucket=minio_bucket,
        Key="mp/obj",
        UploadId=up,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]} for n in (1, 2, 3)]},
    )
    assert client.get_object(Bucket=minio_bucket, Key="mp/obj")["Body"].read() == b"".join(parts)


def test_abort_multipart_upload_leaves_nothing(minio: Any, minio_bucket: str) -> None:
    client = minio.client()
    up = client.create_multipart_upload(Bucket=minio_bucket, Key="ab/obj")["UploadId"]
    client.upload_part(Bucket=minio_bucket, Key="ab/obj", UploadId=up, PartNumber=1, Body=os.urandom(MB))
    client.abort_multipart_upload(Bucket=minio_bucket, Key="ab/obj", UploadId=up)
    assert keys_and_prefixes(client, minio_bucket)[0] == []
    with pytest.raises(bce.ClientError) as ei:
        client.head_object(Bucket=minio_bucket, Key="ab/obj")
    assert error_code(ei)[1] == 404


def test_list_with_prefix_and_delimiter(minio: Any, minio_bucket: str) -> None:
    client = minio.client()
    for k in ["a/1", "a/2", "a/b/3", "a/b/c/4", "ab/5", "c", "step-1/x", "step-10/x", "with space/ü.json"]:
        client.put_object(Bucket=minio_bucket, Key=k, Body=k.encode())
    assert keys_and_prefixes(client, minio_bucket, Delimiter="/") == (
        ["c"],
        ["a/", "ab/", "step-1/", "step-10/", "with space/"],
    )
    assert keys_and_prefixes(client, minio_bucket, Prefix="a/", Delimiter="/") == (["a/1", "a/2"], ["a/b/"])
    assert keys_and_prefixes(client, minio_bucket, Prefix="a/") == (["a/1", "a/2", "a/b/3", "a/b/c/4"], [])
    assert keys_and_prefixes(client, minio_bucket, Prefix="step-1/") == (["step-1/x"], [])
    assert keys_and_prefixes(client, minio_bucket, Prefix="a")[0] == ["a/1", "a/2", "a/b/3", "a/b/c/4", "ab/5"]
    assert keys_and_prefixes(client, minio_bucket, Prefix="with space/") == (["with space/ü.json"], [])
    assert keys_and_prefixes(client, minio_bucket, Prefix="nope/", Delimiter="/") == ([], [])
    # what s3.list_dirs and s3.list_objects build on
    assert s3.list_dirs(client, f"s3://{minio_bucket}/a") == ["b"]
    assert [o.key for o in s3.list_objects(client, f"s3://{minio_bucket}/step-1")] == ["step-1/x"]


def test_list_pagination(minio: Any, minio_bucket: str) -> None:
    client = minio.client()
    want = [f"p/{i:03d}" for i in range(25)]
    for k in want:
        client.put_object(Bucket=minio_bucket, Key=k, Body=b"")
    got, token, pages = [], None, 0
    while True:
        r = client.list_objects_v2(
            Bucket=minio_bucket, Prefix="p/", MaxKeys=10, **({"ContinuationToken": token} if token else {})
        )
        got += [o["Key"] for o in r.get("Contents", [])]
        pages += 1
        if not r.get("IsTruncated"):
            break
        token = r["NextContinuationToken"]
    assert got == want and pages == 3
    assert [o.key for o in s3.list_objects(client, f"s3://{minio_bucket}/p")] == want


def test_listing_is_consistent_right_after_put_and_delete(minio: Any, minio_bucket: str) -> None:
    client = minio.client()
    for i in range(20):
        key = f"ckpt/step-{i:09d}/manifest.json"
        client.put_object(Bucket=minio_bucket, Key=key, Body=b"{}")
        assert keys_and_prefixes(client, minio_bucket, Prefix="ckpt/")[0] == [key]
        assert keys_and_prefixes(client, minio_bucket, Prefix="ckpt/", Delimiter="/")[1] == [f"ckpt/step-{i:09d}/"]
        client.delete_object(Bucket=minio_bucket, Key=key)
        assert keys_and_prefixes(client, minio_bucket, Prefix="ckpt/")[0] == []
        # no "directory" lingers once its last object is gone
        assert keys_and_prefixes(client, minio_bucket, Prefix="ckpt/", Delimiter="/") == ([], [])


def test_overwrite_is_visible_at_once(minio: Any, minio_bucket: str) -> None:
    client = minio.client()
    for i in range(10):
        body = os.urandom(1000 + i)
        client.put_object(Bucket=minio_bucket, Key="same", Body=body)
        assert client.get_object(Bucket=minio_bucket, Key="same")["Body"].read() == body
        assert client.head_object(Bucket=minio_bucket, Key="same")["ContentLength"] == len(body)


def test_delete_objects_in_batches(minio: Any, minio_bucket: str) -> None:
    client = minio.client()
    keys = [f"d/{i:04d}" for i in range(1005)]  # more than one DeleteObjects batch (1000)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=minio_bucket, Key=k, Body=b"x"), keys))
    client.put_object(Bucket=minio_bucket, Key="keep", Body=b"x")
    assert s3.delete_keys(client, minio_bucket, keys + ["d/missing-is-fine"]) == len(keys) + 1
    assert keys_and_prefixes(client, minio_bucket) == (["keep"], [])
    r = client.delete_objects(Bucket=minio_bucket, Delete={"Objects": [{"Key": "keep"}, {"Key": "gone"}]})
    assert sorted(d["Key"] for d in r["Deleted"]) == ["gone", "keep"] and not r.get("Errors")


def test_head_and_ranged_get(minio: Any, minio_bucket: str) -> None:
    client = minio.client()
    body = bytes(range(256)) * 40
    client.put_object(Bucket=minio_bucket, Key="r.bin", Body=body, ContentType="application/json")
    h = client.head_object(Bucket=minio_bucket, Key="r.bin")
    assert h["ContentLength"] == len(body) and h["ETag"].strip('"') == hashlib.md5(body).hexdigest()
    assert h["ContentType"] == "application/json" and h["LastModified"] is not None
    r = client.get_object(Bucket=minio_bucket, Key="r.bin", Range="bytes=10-19")
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 206 and r["Body"].read() == body[10:20]
    assert r["ContentRange"] == f"bytes 10-19/{len(body)}"
    assert client.get_object(Bucket=minio_bucket, Key="r.bin", Range="bytes=-5")["Body"].read() == body[-5:]
    assert client.get_object(Bucket=minio_bucket, Key="r.bin", Range="bytes=10000-")["Body"].read() == body[10000:]
    client.put_object(Bucket=minio_bucket, Key="empty", Body=b"")  # the access-check probe
    assert client.head_object(Bucket=minio_bucket, Key="empty")["ContentLength"] == 0
    assert client.get_object(Bucket=minio_bucket, Key="empty")["Body"].read() == b""
    with pytest.raises(bce.ClientError) as ei:
        client.head_object(Bucket=minio_bucket, Key="nope")
    assert error_code(ei)[1] == 404
    with pytest.raises(bce.ClientError) as ei:
        client.get_object(Bucket=minio_bucket, Key="nope")
    assert error_code(ei) == ("NoSuchKey", 404)


def test_upload_dir_lists_no_directory_markers(minio: Any, minio_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "m"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_bytes(b"1")
    (src / "g").write_bytes(b"2")
    client = minio.client()
    s3.upload_dir(client, src, f"s3://{minio_bucket}/models/m")
    assert sorted(o.key for o in s3.list_objects(client, f"s3://{minio_bucket}/models")) == [
        "models/m/a/b/f",
        "models/m/g",
    ]


def test_bucket_creation_and_missing_buckets(minio: Any) -> None:
    client = minio.client()
    name = minio.make_bucket("made")
    client.head_bucket(Bucket=name)
    assert name in [b["Name"] for b in client.list_buckets()["Buckets"]]
    with pytest.raises(bce.ClientError) as ei:
        client.create_bucket(Bucket=name)
    assert error_code(ei)[0] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
    missing = f"missing-{os.urandom(4).hex()}"
    with pytest.raises(bce.ClientError) as ei:
        client.list_objects_v2(Bucket=missing, MaxKeys=1)
    assert error_code(ei) == ("NoSuchBucket", 404)
    with pytest.raises(bce.ClientError) as ei:
        client.put_object(Bucket=missing, Key="k", Body=b"v")  # no bucket made on the fly
    assert error_code(ei) == ("NoSuchBucket", 404)
    with pytest.raises(bce.ClientError) as ei:
        client.head_bucket(Bucket=missing)
    assert error_code(ei)[1] == 404


@pytest.mark.parametrize("who", ["bad-access-key", "bad-secret-key", "anonymous"])
def test_credentials_are_checked(minio: Any, minio_bucket: str, who: str) -> None:
    if who == "anonymous":
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=minio.endpoint,
            region_name=minio.region,
            config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}),
        )
        want = "AccessDenied"
    else:
        ak = "WRONGKEY1234" if who == "bad-access-key" else minio.access_key
        sk = "wrong-secret-key-123" if who == "bad-secret-key" else minio.secret_key
        client = s3.make_client(minio.s3_spec(), access_key=ak, secret_key=sk, max_attempts=1)
        want = "InvalidAccessKeyId" if who == "bad-access-key" else "SignatureDoesNotMatch"
    for call in (
        lambda: client.list_objects_v2(Bucket=minio_bucket, MaxKeys=1),
        lambda: client.put_object(Bucket=minio_bucket, Key="x", Body=b"x"),
        lambda: client.get_object(Bucket=minio_bucket, Key="x"),
    ):
        with pytest.raises(bce.ClientError) as ei:
            call()
        assert error_code(ei) == (want, 403)
    assert keys_and_prefixes(minio.client(), minio_bucket)[0] == [], "a refused put wrote nothing"
