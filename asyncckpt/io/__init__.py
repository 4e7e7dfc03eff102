"""Storage backends behind one declared contract (`.contract`), found through a registry (`.registry`).

Built in: the local disk (`.local`), S3 (`.s3`) and any other fsspec filesystem (`.fsspec`). A new
backend subclasses `Storage` and registers for its URL protocols; the conformance
suite in ``tests/io`` is what every backend must pass.
"""

from .contract import Reader, Sink, Storage
from .registry import register, resolve, unregister

__all__ = ["Reader", "Sink", "Storage", "register", "resolve", "unregister"]
