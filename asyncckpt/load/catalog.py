"""The committed checkpoints directly under a directory or prefix, oldest first."""

from __future__ import annotations

import logging
from typing import Mapping

from ..concurrency.clock import CLOCK
from ..errors import CheckpointError, StorageError
from ..format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, AnyManifest, parse
from ..io.contract import Storage

log = logging.getLogger("asyncckpt")


async def committed(storage: Storage, directory: str, known: Mapping[str, AnyManifest] | None = None
                    ) -> list[tuple[str, AnyManifest]]:
    """``(name, manifest)`` of every committed checkpoint directly under ``directory``, oldest first (by sequence,
    see `asyncckpt.concurrency.clock`).

    ``known`` gives manifests the caller read before (by name): those are not read again, so a caller that lists
    after every save pays for the new entries only. Entries without a valid manifest are skipped and never stop the
    listing: no manifest (a save that crashed or is still running, foreign data) is logged at DEBUG; a manifest that
    is there but unusable (damaged, special file, symlink, oversized, unreadable) at WARNING. An object store that
    fails to return one (a `StorageError`: retries spent, or ``io_timeout``) stops the listing instead: skipping it
    would answer with an older checkpoint as the newest.
    """
    found = []
    for name in await storage.list(directory):
        if name.startswith("."):
            continue
        if known is not None and name in known:
            manifest = known[name]
            found.append((manifest.order, name, manifest))
            continue
        try:
            raw = await storage.read_bytes(storage.join(directory, name, MANIFEST_NAME), MAX_MANIFEST_BYTES)
            manifest = parse(raw, storage.join(directory, name))
        except FileNotFoundError:  # a save still running or crashed, or foreign data: nothing to say
            log.debug("skipping %s: no %s", storage.join(directory, name), MANIFEST_NAME)
            continue
        except StorageError:  # the store failed (retries spent, or io_timeout): skipping would return an older one
            raise
        except (OSError, CheckpointError, MemoryError) as exc:  # a manifest is there but unusable: worth a look
            log.warning("skipping %s: %s", storage.join(directory, name), exc)
            continue
        found.append((manifest.order, name, manifest))
    found.sort(key=lambda x: (x[0], x[1]))
    if found:
        CLOCK.observe(found[-1][0])  # a save after this listing orders after everything in it
    return [(name, manifest) for _, name, manifest in found]
