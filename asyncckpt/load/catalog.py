"""The committed checkpoints directly under a directory or prefix, oldest first."""

from __future__ import annotations

import logging
from typing import Mapping

from ..errors import CheckpointError
from ..format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, AnyManifest, parse
from ..io.contract import Storage

log = logging.getLogger("asyncckpt")


async def committed(storage: Storage, directory: str, known: Mapping[str, AnyManifest] | None = None
                    ) -> list[tuple[str, AnyManifest]]:
    """``(name, manifest)`` of every committed checkpoint directly under ``directory``, oldest snapshot first.

    ``known`` gives manifests the caller read before (by name): those are not read again, so a caller that lists
    after every save pays for the new entries only. Entries without a valid manifest (saves that crashed or are still running, hidden directories, foreign data,
    unreadable or special files) are skipped, and logged at DEBUG: they are never mistaken for a checkpoint and
    never stop the listing.
    """
    found = []
    for name in await storage.list(directory):
        if name.startswith("."):
            continue
        if known is not None and name in known:
            manifest = known[name]
            found.append((manifest.created_ns, name, manifest))
            continue
        try:
            raw = await storage.read_bytes(storage.join(directory, name, MANIFEST_NAME), MAX_MANIFEST_BYTES)
            manifest = parse(raw, storage.join(directory, name))
        except (OSError, CheckpointError, MemoryError) as exc:
            log.debug("skipping %s: %s", storage.join(directory, name), exc)
            continue
        found.append((manifest.created_ns, name, manifest))
    found.sort(key=lambda x: (x[0], x[1]))
    return [(name, manifest) for _, name, manifest in found]
