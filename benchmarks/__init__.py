"""Benchmark harness for asyncckpt: ``python -m benchmarks --help``.

Compares asyncckpt with its peers (torch.save, Lightning AsyncCheckpointIO, torch DCP
async_save, torchsnapshot) and with physical limits measured in the same run (copy floor, raw
write, raw read). ``main(argv)`` runs it programmatically and returns an exit status.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
