"""Benchmark harness for asyncckpt: ``python -m benchmarks --help``.

Compares asyncckpt with its peers (torch.save, Lightning AsyncCheckpointIO, torch DCP
async_save, torchsnapshot) and with physical limits measured in the same run (copy floor, raw
write, raw read). ``main(argv)`` runs it programmatically and returns an exit status.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """``s3 ...`` runs the object-store benchmark (benchmarks/s3.py), ``faces ...`` the two engines in a training
    loop (benchmarks/faces.py), ``incremental ...`` incremental saves (benchmarks/incremental.py), ``trainloop ...``
    what checkpoints cost a training loop (benchmarks/trainloop.py), ``sweep ...`` the synthetic workload at several
    sizes (benchmarks/sweep.py), ``multirank ...`` many ranks through torch.distributed.checkpoint
    (benchmarks/multirank.py); anything else the main harness."""
    if argv and argv[0] == "s3":
        from .s3 import main as s3_main

        return s3_main(argv[1:])
    if argv and argv[0] in ("faces", "incremental", "trainloop", "sweep", "multirank"):
        from importlib import import_module

        return int(import_module(f".{argv[0]}", __name__).main(argv[1:]))
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
