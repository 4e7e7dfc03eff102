"""Helpers for the S3 tests: bucket inspection, independent of the code under test."""

from __future__ import annotations

import asyncio
from typing import Any


def run(coro: Any) -> Any:
    """Run a coroutine on a fresh event loop (each test owns its loop, as an application would)."""
    return asyncio.run(coro)


def keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    """Every object key under ``prefix`` (listed by boto3, independently of the code under test)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def uploads(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    """Keys of multipart uploads still in progress under ``prefix``."""
    return sorted(u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []))
