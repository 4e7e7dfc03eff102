"""Shared test utilities (kept in asyncckpt.testing, which users can import too), and the client of the tests'
fork servers."""

from __future__ import annotations

import json
import os
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


class Ranks(LineServer):
    """The fork server of tests/dist_worker.py, with the scenario modules ``modules`` imported before it forks."""

    def __init__(self, scratch: Path, modules: tuple[str, ...] = ()) -> None:
        self.scratch = scratch  # every group's file store and results go under it (the server removes them)
        here = Path(__file__).resolve().parent
        env = {**os.environ, "PYTHONPATH": str(here.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        super().__init__(here / "dist_worker.py", list(modules), here.parent, env)

    def start(self, scenario: str, world: int = 2, timeout: float = 60, **args: Any) -> list[int]:
        return self.call(cmd="start", scenario=scenario, world=world, args=args, timeout=timeout,
                         dir=str(self.scratch))["pids"]

    def wait(self, pids: list[int], timeout: float = 120) -> tuple[list[int], list[Any]]:
        answer = self.call(cmd="wait", pids=pids, timeout=timeout)
        return answer["rcs"], answer["results"]

    def run(self, scenario: str, world: int = 2, timeout: float = 60, wait_s: float = 120, **args: Any
            ) -> list[Any]:
        rcs, results = self.wait(self.start(scenario, world, timeout, **args), wait_s)
        for rank, (rc, result) in enumerate(zip(rcs, results)):
            assert rc == 0, f"rank {rank} failed (rc={rc}):\n{(result or {}).get('error', result)}"
        return results


__all__ = ["LineServer", "Ranks", "assert_same", "lightning_state", "mixed_state", "same", "tiny_model"]
