"""S3 lane: ``proxy`` (a fault-injecting :class:`FaultProxy` in front of the suite's moto server) and
``proxy_options`` (storage_options through it); the server, client, bucket and options fixtures are suite-wide
(tests/conftest.py)."""

from __future__ import annotations

import pytest

from .faultproxy import FaultProxy


@pytest.fixture
def proxy(moto):
    p = FaultProxy(moto.port).start()
    yield p
    p.stop()


@pytest.fixture
def proxy_options(moto, proxy):
    return moto.options(proxy.url)
