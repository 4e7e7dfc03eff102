"""The plugins and strategies of `asyncckpt.lightning` built on ``pytorch_lightning``'s hierarchy (Lightning's
Trainer accepts only plugins of its own package): ``from asyncckpt.lightning.pl import AsyncCheckpointIO``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from . import (AsyncCheckpointIOMixin, AsyncFSDPStrategyMixin, AsyncModelParallelStrategyMixin, NativeCheckpointIOMixin,
               lazy_classes)

__all__ = ["AsyncCheckpointIO", "NativeCheckpointIO", "AsyncFSDPStrategy", "AsyncModelParallelStrategy"]  # noqa: F822

__getattr__ = lazy_classes(sys.modules[__name__], lambda: "pytorch_lightning")

if TYPE_CHECKING:  # the classes built on first access, as type checkers see them
    from pytorch_lightning.plugins.io.wrapper import _WrappingCheckpointIO
    from pytorch_lightning.strategies import FSDPStrategy, ModelParallelStrategy

    class AsyncCheckpointIO(AsyncCheckpointIOMixin, _WrappingCheckpointIO): ...

    class NativeCheckpointIO(NativeCheckpointIOMixin, _WrappingCheckpointIO): ...

    class AsyncFSDPStrategy(AsyncFSDPStrategyMixin, FSDPStrategy): ...

    class AsyncModelParallelStrategy(AsyncModelParallelStrategyMixin, ModelParallelStrategy): ...
