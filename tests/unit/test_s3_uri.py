"""s3:// URI parsing and S3 error translation: pure, no server."""

import botocore.exceptions as bce
import pytest

from kubetune_contract.progress import ExitCode
from kubetune_trainer.errors import RetriableError, UserError
from kubetune_trainer.s3 import S3NotFound, S3Uri, S3UriError, parse_s3_uri, translate_error


@pytest.mark.parametrize(
    "uri, bucket, key",
    [
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("s3://my.bucket-1/a/b/c.json", "my.bucket-1", "a/b/c.json"),
        ("s3://abc/prefix/", "abc", "prefix/"),
        ("s3://b00/with space/x", "b00", "with space/x"),
        ("s3://" + "a" * 63 + "/k", "a" * 63, "k"),
    ],
)
def test_valid(uri: str, bucket: str, key: str) -> None:
    u = parse_s3_uri(uri)
    assert (u.bucket, u.key) == (bucket, key)


@pytest.mark.parametrize(
    "uri, reason",
    [
        ("", "does not start with s3://"),
        ("bucket/key", "does not start with s3://"),
        ("S3://bucket/key", "lowercase 's3://'"),
        ("gs://bucket/key", "scheme 'gs' is not s3"),
        ("s3://", "bucket name is empty"),
        ("s3:///key", "bucket name is empty"),
        ("s3://Bucket/key", "uppercase"),
        ("s3://my_bucket/key", "3-63 characters"),
        ("s3://ab/key", "3-63 characters"),
        ("s3://" + "a" * 64 + "/key", "3-63 characters"),
        ("s3://-abc/key", "3-63 characters"),
        ("s3://abc-/key", "3-63 characters"),
        ("s3://a..b/key", "adjacent"),
        ("s3://192.168.1.1/key", "IP address"),
        (" s3://bucket/key", "whitespace"),
        ("s3://bucket/key\n", "whitespace"),
        ("s3://bucket/" + "k" * 1025, "longer than 1024"),
    ],
)
def test_invalid_names_field_and_value(uri: str, reason: str) -> None:
    with pytest.raises(S3UriError) as ei:
        parse_s3_uri(uri, field="checkpoints.uri")
    msg = str(ei.value)
    assert msg.startswith("checkpoints.uri: "), msg
    assert repr(uri)[:40] in msg, msg
    assert reason in msg, msg


def test_uri_error_is_a_user_error_and_a_value_error() -> None:
    with pytest.raises(S3UriError) as ei:
        parse_s3_uri("http://x/y")
    assert isinstance(ei.value, UserError) and isinstance(ei.value, ValueError)
    assert ei.value.exit_code == ExitCode.USER_ERROR


def test_non_string() -> None:
    with pytest.raises(S3UriError, match="expected a string"):
        parse_s3_uri(None)  # type: ignore[arg-type]


def test_join_str_and_dir_prefix() -> None:
    u = parse_s3_uri("s3://bkt/jobs/")
    assert str(u.join("ns", "/name/", "checkpoints")) == "s3://bkt/jobs/ns/name/checkpoints"
    assert u.join("a").dir_prefix == "jobs/a/"
    assert S3Uri("bkt").dir_prefix == ""
    assert str(S3Uri("bkt")) == "s3://bkt"
    assert S3Uri("bkt", "a/b.json").name == "b.json"
    assert parse_s3_uri(str(u.join("x y"))) == u.join("x y")


def _client_error(code: str, status: int, message: str = "msg") -> bce.ClientError:
    return bce.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "ListObjectsV2"
    )


@pytest.mark.parametrize(
    "exc, cls, words",
    [
        (_client_error("NoSuchBucket", 404), UserError, ["'bkt' does not exist"]),
        (_client_error("InvalidAccessKeyId", 403), UserError, ["InvalidAccessKeyId", "AWS_ACCESS_KEY_ID"]),
        (_client_error("SignatureDoesNotMatch", 403), UserError, ["SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY"]),
        (_client_error("AccessDenied", 403), UserError, ["access denied", "s3:PutObject"]),
        (_client_error("PermanentRedirect", 301), UserError, ["s3.region"]),
        (_client_error("NoSuchKey", 404), S3NotFound, ["does not exist"]),
        (_client_error("InternalError", 500), RetriableError, ["gave up after retries"]),
        (_client_error("SlowDown", 503), RetriableError, ["SlowDown"]),
        (bce.EndpointConnectionError(endpoint_url="http://h:1"), RetriableError, ["cannot reach"]),
        (bce.ReadTimeoutError(endpoint_url="http://h:1"), RetriableError, ["cannot reach"]),
        (bce.NoCredentialsError(), UserError, ["no usable S3 credentials", "AWS_ACCESS_KEY_ID"]),
    ],
)
def test_translate_error(exc: Exception, cls: type, words: list[str]) -> None:
    err = translate_error(exc, client=None, op="list_objects_v2", target=S3Uri("bkt", "p"), field="checkpoints.uri")
    assert type(err) is cls, err
    assert str(err).startswith("checkpoints.uri: ")
    for w in words:
        assert w in str(err)


def test_unreachable_is_user_error_when_asked() -> None:
    exc = bce.EndpointConnectionError(endpoint_url="http://h:1")
    err = translate_error(exc, client=None, op="x", target="s3://bkt/p", unreachable_is_user_error=True)
    assert isinstance(err, UserError) and "s3.endpoint" in str(err)
