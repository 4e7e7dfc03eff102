"""CUDA copies for the snapshot: device-to-host on a side stream into pinned buffers, fenced by events."""

from __future__ import annotations

from typing import Any

import torch


def side_stream() -> Any:
    """A stream that starts after the work already queued on the current one."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    return stream


def record(stream: Any) -> Any:
    """An event marking the copies queued on ``stream`` so far (the writer waits on it before reading bytes)."""
    event = torch.cuda.Event()
    event.record(stream)
    return event


def fence(stream: Any) -> None:
    """Order the caller's later CUDA work after the copies on ``stream``, so in-place updates cannot race them."""
    torch.cuda.current_stream().wait_event(record(stream))
