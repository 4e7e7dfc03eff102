"""Which backend serves which URL protocol: data, not code (``"module:Class"`` strings, imported on first use).

Lookup order for a protocol: backends registered at run time (`register`), then installed packages'
entry points in the ``asyncckpt.storage`` group (name = protocol, value = ``"module:Class"``), then the built-in
table, then the generic fsspec backend, which serves every protocol fsspec knows.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Mapping

from ..concurrency import IoRunner
from ..errors import CheckpointError, InvalidArgumentError
from .contract import Storage
from .paths import is_local, protocol_of

BUILTIN: dict[str, str] = {
    "file": "asyncckpt.io.local:LocalStorage",
    "local": "asyncckpt.io.local:LocalStorage",
    "s3": "asyncckpt.io.s3:S3Storage",
    "s3a": "asyncckpt.io.s3:S3Storage",
    "gs": "asyncckpt.io.gcs:GCSStorage",
    "gcs": "asyncckpt.io.gcs:GCSStorage",
    "az": "asyncckpt.io.azure:AzureStorage",
    "abfs": "asyncckpt.io.azure:AzureStorage",
    "abfss": "asyncckpt.io.azure:AzureStorage",
}
GENERIC = "asyncckpt.io.fsspec:FsspecStorage"

#: the package that brings each protocol's fsspec implementation, for the error that says what to install.
INSTALL_HINTS: dict[str, str] = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "abfss": "adlfs", "az": "adlfs",
    "adl": "adlfs", "hf": "huggingface_hub", "sftp": "paramiko", "ssh": "paramiko", "hdfs": "pyarrow",
    "webhdfs": "requests", "http": "aiohttp", "https": "aiohttp", "oci": "ocifs", "oss": "ossfs",
}

_registered: dict[str, Any] = {}


def register(protocol: str, target: str | type[Storage], *, clobber: bool = False) -> None:
    """Serve ``protocol`` with ``target`` in this process, ahead of entry points and the built-in backends.

    Args:
        protocol: the URL protocol, without ``://`` (``"myfs"`` for ``myfs://bucket/run``).
        target: a `Storage` subclass, or ``"module:Class"`` (imported on first use).
        clobber: replace a backend registered before for ``protocol``.

    Raises:
        InvalidArgumentError: a backend is already registered for ``protocol`` and ``clobber`` is not set.

    Example:
        ```python
        asyncckpt.io.register("myfs", "mypackage.storage:MyStorage")
        engine.save(state, "myfs://bucket/run/step-100")
        ```
    """
    if protocol in _registered and not clobber:
        raise InvalidArgumentError(f"a storage backend is already registered for {protocol}://; pass clobber=True")
    _registered[protocol] = target


def unregister(protocol: str) -> None:
    """Undo `register` for ``protocol`` (the built-in or entry-point backend serves it again).

    Args:
        protocol: the URL protocol; one never registered is ignored.
    """
    _registered.pop(protocol, None)


def _load(target: str | type[Storage], protocol: str) -> type[Storage]:
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        hint = INSTALL_HINTS.get(protocol)
        raise CheckpointError(f"{protocol}:// paths need {exc.name or module}, which is not installed"
                              + (f" (pip install {hint})" if hint else "")) from exc


def backend_for(protocol: str) -> type[Storage]:
    target: str | type[Storage] | None = _registered.get(protocol)
    if target is None:
        found = entry_points(group="asyncckpt.storage", name=protocol)
        target = next(iter(found)).value if found else BUILTIN.get(protocol, GENERIC)
    return _load(target, protocol)


def resolve(url: str, storage_options: Mapping[str, Any] | None, io: IoRunner) -> tuple[Storage, str]:
    """The backend and filesystem path for a user path or URL (on the engine's loop: async clients bind to it)."""
    protocol = protocol_of(url)
    backend = backend_for(protocol)
    storage = backend.create(protocol, None if is_local(url) else storage_options, io)
    return storage, storage.strip(url)
