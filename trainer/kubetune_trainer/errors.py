"""The trainer's exception classes; each carries the exit code the operator acts on.

Light on purpose (no torch, no boto3): the operator side may import it too.
"""

from __future__ import annotations

from typing import ClassVar

from kubetune_contract.progress import ExitCode


class KubetuneError(Exception):
    """Base class. Unknown failures are treated as infrastructure trouble: retry."""

    exit_code: ClassVar[ExitCode] = ExitCode.RETRIABLE


class UserError(KubetuneError):
    """Something the user must fix (config, data, bucket, credentials); retrying cannot help.

    The message is shown to the user as the job's condition message: say what is wrong and
    name the field, file, bucket or endpoint involved.
    """

    exit_code = ExitCode.USER_ERROR


class RetriableError(KubetuneError):
    """A transient infrastructure failure (network, S3 5xx) that outlived our own retries."""

    exit_code = ExitCode.RETRIABLE


class CorruptCheckpoint(KubetuneError):
    """A committed checkpoint whose files do not match its manifest (missing, size, sha256)."""

    exit_code = ExitCode.RETRIABLE
