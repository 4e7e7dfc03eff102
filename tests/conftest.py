"""Suite-wide set-up and fixtures.

* Local paths go through a LocalStorage whose OS calls can be faulted (tests/faultfs.py). Without an active fault
  plan it passes every call straight to the real OsOps, so every other test sees the plain local disk; the
  reliability tests switch faults on with ``faultfs.faulty_os(plan)``.
* A real moto S3 server on a loopback port (one per session, started on first use), no mocks of s3fs or botocore:
  ``moto`` (the server process), ``s3`` (a boto3 client used to inspect buckets independently of the code under
  test), ``bucket`` (a fresh bucket per test) and ``options`` (storage_options pointing at moto with dummy keys).
"""

from __future__ import annotations

import os
import sys
import uuid

# gcsfs otherwise probes every bucket over gRPC for zonal/HNS features (60 s against the emulator); read on import
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

import faultfs  # noqa: E402

from asyncckpt.testing import Azurite, GCSEmulator, MotoServer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _faultable_local_disk():
    faultfs.install()
    yield
    faultfs.uninstall()


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


@pytest.fixture(scope="session")
def gcs():
    server = GCSEmulator()
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(gcs):
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(name)
    return name


@pytest.fixture
def gcs_options(gcs):
    return gcs.options()


@pytest.fixture(scope="session")
def azurite():
    server = Azurite()
    yield server
    server.stop()


@pytest.fixture
def az_container(azurite):
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    azurite.client().create_container(name)
    return name


@pytest.fixture
def az_options(azurite):
    return azurite.options()
