"""Which S3 failures are worth retrying, and how a final one reads (the loop itself is `asyncckpt.io.retry`).

Retrying happens once, here. Left alone, botocore retries each request (5 attempts) and s3fs retries again around
it (5 more on throttling), so attempts multiply to 25 and the back-off is not configurable; the storage turns both
inner layers down to a single attempt unless ``config_kwargs["retries"]`` is given explicitly.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from typing import Any, Awaitable, Callable

from ...errors import S3Error
from ...options import RetryPolicy
from ..retry import causes, retrying as retry_loop

HINTS = {
    "NoSuchBucket": "the bucket does not exist (asyncckpt never creates buckets); create it or fix the URL",
    "AccessDenied": "the credentials are not allowed to do this on this bucket/key",
    "403": "the credentials are not allowed to do this on this bucket/key",
    "AllAccessDisabled": "all access to this bucket is disabled",
    "InvalidAccessKeyId": "the access key is unknown to this endpoint; check key/secret and endpoint_url",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "ExpiredToken": "the session token expired; refresh the credentials",
    "InvalidToken": "the session token is malformed or invalid",
    "PermanentRedirect": "the bucket lives in another region; set client_kwargs={'region_name': ...}",
    "AuthorizationHeaderMalformed": "the region in client_kwargs does not match the bucket's region",
    "InvalidBucketName": "the bucket name is not valid",
    "NoSuchUpload": "the multipart upload was aborted (by another process or a lifecycle rule)",
    "EntityTooSmall": "a multipart part is below the store's minimum size; raise chunk_bytes",
}


@functools.cache
def _transient() -> tuple[frozenset[str], frozenset[int], tuple[type[BaseException], ...]]:
    """Error codes, statuses and exception types botocore's "standard" retry mode and s3fs treat as transient
    (read from those packages on first use, so importing asyncckpt imports neither)."""
    codes = {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown", "Throttling",
             "ThrottlingException", "RequestThrottled", "TooManyRequestsException", "InternalError",
             "ServiceUnavailable", "BandwidthLimitExceeded", "RequestLimitExceeded"}
    statuses = {500, 502, 503, 504}
    types: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, asyncio.TimeoutError, socket.timeout)
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
        from botocore.retries import standard

        codes |= set(standard.TransientRetryableChecker._TRANSIENT_ERROR_CODES)
        codes |= set(standard.ThrottledRetryableChecker._THROTTLED_ERROR_CODES)
        statuses |= set(standard.TransientRetryableChecker._TRANSIENT_STATUS_CODES)
        types += (BotoConnectionError, HTTPClientError)
    except (ImportError, AttributeError):  # private names moved: the literal sets above still cover S3
        pass
    try:
        from s3fs.core import S3_RETRYABLE_ERRORS  # timeouts, broken reads, garbled throttling responses

        types += tuple(S3_RETRYABLE_ERRORS)
    except ImportError:
        pass
    try:
        import aiohttp

        types += (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError)
    except (ImportError, AttributeError):
        pass
    return frozenset(codes), frozenset(statuses), types


def _client_error(exc: BaseException | None) -> Any:
    """The botocore ClientError behind ``exc`` (s3fs re-raises them as OSError subclasses), or None."""
    return next((e for e in causes(exc) if isinstance(getattr(e, "response", None), dict)), None)


def error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """S3 error code and HTTP status of a failed request, when the server answered."""
    err = _client_error(exc)
    if err is None:
        return None, None
    code = err.response.get("Error", {}).get("Code")
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status is None and isinstance(code, str) and code.isdigit():
        status = int(code)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, server errors, dropped connections, timeouts."""
    codes, statuses, types = _transient()
    code, status = error_code(exc)
    if code is not None or status is not None:
        return code in codes or status in statuses
    return any(isinstance(current, types) and not isinstance(current, (FileNotFoundError, PermissionError))
               for current in causes(exc))


def is_missing_key(exc: BaseException) -> bool:
    """A missing object (normal control flow for callers), as opposed to a missing bucket."""
    if not isinstance(exc, FileNotFoundError):
        return False
    code, _ = error_code(exc)
    return code != "NoSuchBucket"


def failure(exc: BaseException, op: str, bucket: str, key: str, attempts: int, seconds: float,
            transient: bool) -> S3Error:
    """The S3Error that reports ``exc``: the store's own words, and what to do about it."""
    code, status = error_code(exc)
    if code and not code.isdigit():
        what = code
    else:
        what = type(exc).__name__ if status is None else f"HTTP {status}"
    detail = str(exc).strip() or type(exc).__name__
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if transient:
        msg = (f"S3 {op} on {where} kept failing ({what}: {detail}) after {attempts} attempts over "
               f"{seconds:.1f}s; the store is throttling or unreachable — retry later or raise RetryPolicy.attempts")
    else:
        hint = HINTS.get(code or "", "")
        msg = f"S3 {op} on {where} failed: {what}: {detail}" + (f" — {hint}" if hint else "") + " (not retried)"
    return S3Error(msg, bucket=bucket, key=key, operation=op, code=code, attempts=attempts)


async def retrying(op: str, bucket: str, key: str, fn: Callable[[], Awaitable[Any]], policy: RetryPolicy) -> Any:
    """``await fn()``, retried per ``policy`` while it fails transiently."""
    return await retry_loop(f"{op} on s3://{bucket}/{key}", fn, policy, transient=is_transient, passes=is_missing_key,
                            fail=lambda exc, attempts, seconds, transient: failure(exc, op, bucket, key, attempts,
                                                                                   seconds, transient))
