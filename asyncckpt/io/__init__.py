"""Storage backends behind one declared contract (:mod:`.contract`), found through a registry (:mod:`.registry`).

Built in: the local disk (:mod:`.local`), S3 (:mod:`.s3`) and any other fsspec filesystem (:mod:`.fsspec`). A new
backend subclasses :class:`~asyncckpt.io.contract.Storage` and registers for its URL protocols; the conformance
suite in ``tests/io`` is what every backend must pass.
"""

from .contract import Reader, Sink, Storage
from .registry import register, resolve, unregister

__all__ = ["Reader", "Sink", "Storage", "register", "resolve", "unregister"]
