"""The layer contract (.importlinter) holds, and it is not vacuous: an upward import breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint(root: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(root / ".importlinter"), "--no-cache"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_layer_contract_holds():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "asyncckpt", tmp_path / "asyncckpt")
    shutil.copy(ROOT / ".importlinter", tmp_path)
    with open(tmp_path / "asyncckpt" / "format" / "checksum.py", "a") as f:
        f.write("\nimport asyncckpt  # noqa: E402  (the root re-exports the engines)\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0 and "asyncckpt.format is not allowed to import" in proc.stdout, proc.stdout
