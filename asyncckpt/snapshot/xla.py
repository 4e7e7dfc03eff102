"""PyTorch/XLA support: batched device<->host moves.

Importing this module never imports ``torch_xla``; a function imports it only when it has XLA work to do, so the
engine can call into here unconditionally. Which process writes is the trainer's business (Lightning calls the
CheckpointIO on global rank zero only).

Snapshot semantics: `to_cpu` returns fresh host tensors that share no memory with the device
buffers, so the snapshot is a point-in-time copy even though training keeps mutating the parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["is_xla", "to_cpu", "to_xla", "xla_device"]


def is_xla(t: torch.Tensor) -> bool:
    """True when ``t`` lives on an XLA device (cheap: no torch_xla import)."""
    return t.device.type == "xla"


def _xlac():
    import torch_xla

    return torch_xla._XLAC


def to_cpu(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copy ``tensors`` to host memory in one batched device-to-host transfer.

    Pending lazy work that the given tensors depend on is executed first (one graph execution for all
    of them, not a global ``torch_xla.sync()``, which would also cut the caller's unrelated pending
    graph). The result has the same length and order; XLA inputs become new contiguous CPU tensors
    with the same dtype and shape, detached from autograd; non-XLA inputs are returned unchanged.
    """
    idx = [i for i, t in enumerate(tensors) if is_xla(t)]
    out = list(tensors)
    if not idx:
        return out
    xla_tensors = [tensors[i] for i in idx]
    X = _xlac()
    if hasattr(X, "_xla_get_cpu_tensors"):
        # The same pair torch_xla's own xm.save uses (via xm._maybe_convert_to_cpu); called directly
        # because that helper skips nn.Parameter (it selects type(v) == torch.Tensor) and walks a tree.
        X._xla_sync_multi(xla_tensors, devices=[], wait=True, sync_xla_data=False)
        host = X._xla_get_cpu_tensors(xla_tensors)
    else:  # pragma: no cover - a torch_xla without the batched call: correct, just slower
        host = [t.cpu() for t in xla_tensors]
    for i, h in zip(idx, host):
        out[i] = h.detach() if h.requires_grad else h
    return out


_UNSIGNED_WIDE = (torch.uint16, torch.uint32, torch.uint64)


def xla_device(device: str | torch.device | None = None) -> torch.device:
    """Normalise ``"xla"``/``"xla:N"``/``torch.device`` to a concrete XLA device (default: this process's)."""
    import torch_xla

    if device is None or torch.device(device).index is None:
        return torch_xla.device()
    return torch.device(device)


def to_xla(tensors: Sequence[torch.Tensor], device: str | torch.device | None = None) -> list[torch.Tensor]:
    """Move CPU tensors to an XLA device in one batched host-to-device transfer.

    ``device`` may be ``"xla"``, ``"xla:0"``, a ``torch.device`` or None (the default XLA device). The
    device copies do not alias the host tensors, so the caller may reuse or free them afterwards.
    """
    if not tensors:
        return []
    import torch_xla.core.xla_model as xm

    dev = xla_device(device)
    out = list(tensors)
    # torch_xla 2.9's batched upload lands uint16/32/64 as int16/32/64 (same bits), and viewing them back is an
    # aten fallback through the host, so those rare dtypes take the per-tensor path, which keeps the dtype.
    batch = [i for i, t in enumerate(tensors) if t.dtype not in _UNSIGNED_WIDE]
    moved = xm.send_cpu_data_to_device([tensors[i].detach().cpu() for i in batch], dev) if batch else []
    for i, m in zip(batch, moved):
        out[i] = m
    for i, t in enumerate(tensors):
        if t.dtype in _UNSIGNED_WIDE:
            out[i] = t.detach().to(dev)
    return out
