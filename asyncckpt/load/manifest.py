"""Reading one checkpoint's manifest, or saying clearly why there is none."""

from __future__ import annotations

from ..errors import CheckpointError, CheckpointNotFoundError, IncompleteCheckpointError
from ..format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SHARD_RE, AnyManifest, parse
from ..io.contract import Storage


async def read_manifest(storage: Storage, path: str, display: str) -> AnyManifest:
    """The validated manifest at ``path`` (one writer's or a multi-rank global one), or a CheckpointError saying why
    there is none."""
    kind = await storage.kind(path)
    if kind is None:
        raise CheckpointNotFoundError(f"no checkpoint at {display}: the path does not exist")
    if kind == "file":
        raise CheckpointError(
            f"{display} is a file, not an asyncckpt checkpoint directory; a torch.save file loads with torch.load "
            "(or convert it: `asyncckpt convert`)")
    try:
        raw = await storage.read_bytes(storage.join(path, MANIFEST_NAME), MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        names = await storage.list(path)
        if any(SHARD_RE.match(n) for n in names):
            raise IncompleteCheckpointError(
                f"{display} was never committed: it holds shard files but no {MANIFEST_NAME} (its save crashed, "
                "failed or is still running); use asyncckpt.latest() on its parent to find the newest committed "
                "checkpoint") from None
        raise CheckpointError(f"{display} is not an asyncckpt checkpoint (no {MANIFEST_NAME})") from None
    return parse(raw, display)
