"""asyncckpt: asynchronous, crash-consistent checkpoints for PyTorch on any fsspec target."""

__version__ = "0.1.0"

from .catalog import committed, latest  # noqa: E402
from .engine import CheckpointEngine  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsafeCheckpointError,
)
from .pipeline import SaveHandle, SaveResult  # noqa: E402
from .sync import SyncEngine, SyncHandle  # noqa: E402

__all__ = [
    "CheckpointEngine", "CheckpointError", "CorruptCheckpointError", "IncompleteCheckpointError",
    "SaveHandle", "SaveResult", "SyncEngine", "SyncHandle", "UnsafeCheckpointError", "__version__", "committed",
    "latest",
]
