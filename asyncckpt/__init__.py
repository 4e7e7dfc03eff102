"""asyncckpt: asynchronous, crash-consistent checkpoints for PyTorch on any fsspec target."""

from .catalog import committed, latest
from .engine import CheckpointEngine
from .errors import (
    BudgetExceededError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    NewerFormatError,
    S3Error,
    StorageError,
    StorageTimeoutError,
    UnsafeCheckpointError,
)
from .format.manifest import GlobalManifest, Manifest
from .manager import CheckpointManager, SyncCheckpointManager
from .options import EngineOptions, RetryPolicy
from .pipeline.handles import SaveHandle, SaveResult
from .sync_engine import SyncEngine, SyncHandle
from .tools.convert import Conversion, from_torch_file, to_safetensors, to_torch_file
from .tools.inspect import Verification, verify
from .version import __version__


def _rank_face(options: EngineOptions, process_group: object) -> object:
    """``CheckpointEngine(process_group=pg)``'s multi-rank face, from the layer above the engine (imported only
    when an engine is given a group: it loads torch.distributed.checkpoint)."""
    from .dcp import RankFace

    return RankFace(options, process_group)


CheckpointEngine.rank_face = _rank_face

__all__ = [
    "BudgetExceededError", "CheckpointEngine", "CheckpointError", "CheckpointManager", "CheckpointNotFoundError",
    "CheckpointReplacedError",
    "Conversion", "CorruptCheckpointError",
    "EngineOptions", "GlobalManifest", "IncompleteCheckpointError", "InvalidArgumentError", "Manifest",
    "NewerFormatError", "RetryPolicy", "S3Error", "SaveHandle", "SaveResult", "StorageError",
    "StorageTimeoutError", "SyncCheckpointManager",
    "SyncEngine", "SyncHandle", "UnsafeCheckpointError", "Verification", "__version__", "committed",
    "from_torch_file", "latest", "to_safetensors", "to_torch_file", "verify",
]
