"""The public API is typed: a user's script passes ``mypy --strict``, and a script with seven mistakes shows each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "typing"
ROOT = HERE.parents[1]


def mypy(script: str) -> subprocess.CompletedProcess:
    pytest.importorskip("mypy")
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(HERE / "mypy.ini"), "--no-incremental",
                           str(HERE / script)], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_the_package_ships_its_types():
    assert (ROOT / "asyncckpt" / "py.typed").exists()


def test_a_correct_user_script_type_checks_strictly():
    proc = mypy("user_ok.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_each_mistake_in_a_user_script_is_caught():
    expected = {i + 1: m.group(1) for i, line in enumerate((HERE / "user_bad.py").read_text().splitlines())
                if (m := re.search(r"# expect: ([a-z-]+)", line))}
    assert len(expected) == 7
    proc = mypy("user_bad.py")
    found = {int(m.group(1)): m.group(2) for m in re.finditer(r"user_bad\.py:(\d+): error: .*\[([a-z-]+)\]",
                                                              proc.stdout)}
    assert found == expected, proc.stdout
