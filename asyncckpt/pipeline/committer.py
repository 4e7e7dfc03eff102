"""Committer: publish a checkpoint by writing its manifest last, then sweep what no manifest names.

The manifest is built from the plan (structure and records) and the writers' results (shard files and
checksums), written with the storage's atomic put — the commit — and only then are shard files of earlier saves of
the same path and leftovers of killed saves deleted. A crash at any moment leaves the old manifest or the new one.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from ..format.manifest import MANIFEST_NAME, SHARD_RE, Manifest, is_temporary
from ..io.contract import Storage


def save_id_of(name: str) -> str | None:
    """The save id in a shard file name, or None if ``name`` is not one of ours."""
    return name.split("-")[1] if SHARD_RE.match(name) else None


class Committer:
    """Publishes manifests under ``directory``."""

    def __init__(self, storage: Storage, directory: str, fsync: bool) -> None:
        self.storage, self.directory, self.fsync = storage, directory, fsync
        self.publishing = False  # the manifest write has started: it may have taken effect even if it raised

    async def commit(self, manifest: Manifest, running: Callable[[], set[str]]) -> int:
        """Write ``manifest`` atomically, then sweep; returns the manifest's size. ``running()`` names the save ids
        of saves of this path still in flight, whose files the sweep must leave alone."""
        data = manifest.seal()
        with anyio.CancelScope(shield=True):  # once the commit starts it completes: no manifest without shards
            self.publishing = True
            await self.storage.put_atomic(self.storage.join(self.directory, MANIFEST_NAME), data, self.fsync)
            try:
                await self.sweep(manifest, running())
            except Exception:  # best effort: the checkpoint is committed; the next save of this path sweeps again
                pass
        return len(data)

    async def sweep(self, manifest: Manifest, running: set[str]) -> None:
        """Delete shards of earlier saves of this path (now unreferenced) and leftovers of killed saves."""
        mine = {s.file for s in manifest.shards}
        for name in await self.storage.list(self.directory):
            save_id = save_id_of(name)
            stale_shard = save_id is not None and name not in mine and save_id not in running
            if stale_shard or is_temporary(name):
                await self.storage.remove(self.storage.join(self.directory, name))
