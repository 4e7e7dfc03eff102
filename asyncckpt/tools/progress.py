"""Progress reporting for long operations: a ``progress(description, total_bytes)`` factory hands out bars."""

from __future__ import annotations

import sys
import time
import types
from typing import Any, Callable, Protocol

PROGRESS_MIN_BYTES = 64 << 20  # below this a bar would only flash by


class Bar(Protocol):
    def update(self, n: int) -> Any: ...
    def close(self) -> Any: ...


#: ``progress(description, total_bytes)`` returns a bar, or None for none.
Progress = Callable[[str, int], "Bar | None"]
NO_BAR: Bar = types.SimpleNamespace(update=lambda n: None, close=lambda: None)  # type: ignore[assignment]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def progress_bar(progress: Progress | None, desc: str, total: int) -> Bar:
    made = progress(desc, total) if progress else None
    return NO_BAR if made is None else made


class Counting:
    """A file that counts the bytes passing through it on a progress bar."""

    def __init__(self, f: Any, bar: Bar) -> None:
        self.f, self.bar = f, bar

    def write(self, data: Any) -> int:
        self.bar.update(memoryview(data).nbytes)
        return self.f.write(data)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bar.update(len(data))
        return data

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        self.bar.update(n or 0)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


class TextBar:
    """A plain progress bar on stderr, for when tqdm is not installed."""

    def __init__(self, desc: str, total: int) -> None:
        self.desc, self.total, self.n, self.drawn = desc, max(total, 0), 0, 0.0

    def update(self, n: int, end: str = "") -> None:
        self.n += n
        if end or time.monotonic() - self.drawn >= 0.1:
            self.drawn = time.monotonic()
            frac = min(self.n / self.total, 1.0) if self.total else 1.0
            sys.stderr.write(f"\r{self.desc:<6} [{'#' * int(frac * 30):.<30}] {frac:4.0%}  "
                             f"{human_bytes(min(self.n, self.total))} / {human_bytes(self.total)}  {end}")
            sys.stderr.flush()

    def close(self) -> None:
        self.update(0, "\n")


def terminal_progress(mode: str) -> Progress:
    """Bars on stderr for ``mode`` ``"on"``, ``"off"`` or ``"auto"`` (a terminal and at least 64 MiB): tqdm's
    when it is installed, a plain one otherwise."""
    def make(desc: str, total: int) -> Bar | None:
        if mode == "off" or (mode == "auto" and (total < PROGRESS_MIN_BYTES or not sys.stderr.isatty())):
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return TextBar(desc, total)
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                    leave=False, dynamic_ncols=True)

    return make
