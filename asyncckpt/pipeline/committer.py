"""Committer: publish a checkpoint by writing its manifest last, then sweep what no manifest names.

The manifest is built from the plan (structure and records) and the writers' results (shard files and
checksums), written with the storage's atomic put — the commit — and only then are shard files of earlier saves of
the same path and leftovers of killed saves deleted. A crash at any moment leaves the old manifest or the new one.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from ..errors import CheckpointError
from ..format.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, REF_PREFIX, SHARD_RE, AnyManifest, is_temporary,
                               parse)
from ..io.contract import Storage


def save_id_of(name: str) -> str | None:
    """The save id in a shard file name, or None if ``name`` is not one of ours."""
    return name.split("-")[1] if SHARD_RE.match(name) else None


class Committer:
    """Publishes manifests under ``directory``."""

    REMOVALS = 16  # files a sweep removes at once

    def __init__(self, storage: Storage, directory: str, fsync: bool) -> None:
        self.storage, self.directory, self.fsync = storage, directory, fsync
        self.publishing = False  # the manifest write has started: it may have taken effect even if it raised

    async def commit(self, manifest: AnyManifest, running: Callable[[], set[str]], *, sweep: bool = True) -> int:
        """Write ``manifest`` atomically, then (``sweep``) delete what is stale; returns the manifest's size.
        ``running()`` names the save ids of saves of this path still in flight, whose files the sweep must leave
        alone. A manifest that references other checkpoints first marks each of them (so their own sweeps and
        removals keep those shards). Without ``sweep``, the caller finds the stale files (`stale`) and removes
        them (`remove`) when it likes: the checkpoint is committed either way."""
        data = manifest.seal()
        if len(data) > MAX_MANIFEST_BYTES:  # never publish what a load would refuse
            raise CheckpointError(f"the manifest of {self.directory} would take {len(data)} bytes, more than the "
                                  f"{MAX_MANIFEST_BYTES} a load reads; nothing was committed — save fewer tensors "
                                  "or smaller plain values per checkpoint")
        parent, name = self.storage.split(self.directory)
        for base in sorted(manifest.bases):
            await self.storage.put_atomic(self.storage.join(parent, base, REF_PREFIX + name), name.encode(),
                                          self.fsync)
        with anyio.CancelScope(shield=True):  # once the commit starts it completes: no manifest without shards
            self.publishing = True
            await self.storage.put_atomic(self.storage.join(self.directory, MANIFEST_NAME), data, self.fsync)
            if sweep:
                try:
                    await self.remove(await self.stale(manifest, running))
                except Exception:  # best effort: the checkpoint is committed; the next save of this path sweeps
                    pass
        return len(data)

    async def stale(self, manifest: AnyManifest, running: Callable[[], set[str]]) -> list[str]:
        """The shards of earlier saves of this path (now unreferenced, also by incremental checkpoints that build
        on this one) and leftovers of killed saves: what a sweep deletes once ``manifest`` is committed. Saves
        still running are asked for after the listing, so a file the listing shows is never one of theirs."""
        names = await self.storage.list(self.directory)
        keep = {s.file for s in manifest.shards if s.base is None}
        for files in (await references(self.storage, self.directory, names)).values():
            keep |= files
        live = running()
        return [name for name in names if is_temporary(name)
                or name not in keep and save_id_of(name) not in (None, *live)]

    async def remove(self, names: list[str]) -> None:
        """Delete ``names`` (files of this directory), several at once; raises the first failure once every
        removal has ended."""
        limiter = anyio.CapacityLimiter(self.REMOVALS)
        errors: list[Exception] = []

        async def one(name: str) -> None:
            async with limiter:
                try:
                    await self.storage.remove(self.storage.join(self.directory, name))
                except Exception as exc:
                    errors.append(exc)

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(one, name)
        if errors:
            raise errors[0]


async def references(storage: Storage, directory: str, names: list[str]) -> dict[str, set[str]]:
    """The committed incremental checkpoints (found through the ``.ref-<child>`` markers among ``names``, the
    listing of ``directory``) and the files of ``directory`` each references."""
    parent, me = storage.split(directory)
    found: dict[str, set[str]] = {}
    for marker in names:
        if not marker.startswith(REF_PREFIX):
            continue
        child = storage.join(parent, marker[len(REF_PREFIX):])
        try:
            raw = await storage.read_bytes(storage.join(child, MANIFEST_NAME), MAX_MANIFEST_BYTES)
            files = {s.file for s in parse(raw, child).shards if s.base == me}
        except FileNotFoundError:
            continue  # that save never committed (or was removed): it holds nothing of ours
        except CheckpointError:
            raise CheckpointError(f"{directory} is marked as referenced by {child}, whose manifest cannot be read; "
                                  "its shards are kept") from None
        if files:
            found[marker[len(REF_PREFIX):]] = files
    return found
