"""Checkpoints written by earlier releases keep loading and verifying (tests/data/, made by make_v0_1_0.py)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import torch

import asyncckpt

from .helpers import assert_same

DATA = pathlib.Path(__file__).parent / "data"


def test_checkpoint_of_release_0_1_0_loads_bit_exact():
    expected = torch.load(DATA / "v0.1.0" / "expected.pt", weights_only=True)
    with asyncckpt.SyncEngine() as engine:
        loaded = engine.load(DATA / "v0.1.0" / "checkpoint")
    assert_same(loaded, expected)
    assert loaded["tied"][0] is loaded["tied"][1]
    views = loaded["views"]
    assert views[0].untyped_storage().data_ptr() == views[1].untyped_storage().data_ptr()


def test_checkpoint_of_release_0_1_0_verifies():
    out = subprocess.run([sys.executable, "-m", "asyncckpt", "verify", str(DATA / "v0.1.0" / "checkpoint")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok: ")
