"""Shared test utilities (kept in asyncckpt.testing, which users can import too), and the client of the tests'
fork servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from asyncckpt.testing import assert_same, lightning_state, mixed_state, same, tiny_model


class LineServer:
    """A child Python script spoken to in JSON lines, one command and one answer each (the fork servers of the
    crash trials and of the multi-rank tests: one ``import torch`` for all their processes)."""

    def __init__(self, script: Path, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(script), *args], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"fork server died (rc={self.proc.poll()})"
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


__all__ = ["LineServer", "assert_same", "lightning_state", "mixed_state", "same", "tiny_model"]
