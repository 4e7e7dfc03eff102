"""S3 lane: a real moto S3 server on a loopback port (one per session), no mocks of s3fs or botocore.

Fixtures: ``moto`` (the server process), ``s3`` (a boto3 client used to inspect buckets independently of the code
under test), ``bucket`` (a fresh bucket per test), ``options`` (storage_options pointing at moto with dummy keys),
``proxy`` (a fault-injecting :class:`FaultProxy` in front of moto) and ``proxy_options`` (storage_options through it).
"""

from __future__ import annotations

import os
import uuid

import pytest

from .faultproxy import FaultProxy
from .util import MotoServer


@pytest.fixture(scope="session", autouse=True)
def _isolated_aws_env():
    """No real AWS configuration, credentials or metadata service can leak into the tests."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    os.environ.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                      AWS_EC2_METADATA_DISABLED="true")
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def moto(_isolated_aws_env):
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(moto):
    return moto.client()


@pytest.fixture
def bucket(s3):
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def options(moto):
    return moto.options()


@pytest.fixture
def proxy(moto):
    p = FaultProxy(moto.port).start()
    yield p
    p.stop()


@pytest.fixture
def proxy_options(moto, proxy):
    return moto.options(proxy.url)
