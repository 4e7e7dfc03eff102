"""Test support for asyncckpt and for code built on it: deep equality, state builders, storage emulators.

Used by asyncckpt's own tests and benchmarks; importable by users who test their checkpointing code.
"""

from .emulators import Azurite, GCSEmulator, MotoServer, free_port
from .equality import assert_same, same
from .states import lightning_state, mixed_state, tiny_model

__all__ = ["Azurite", "GCSEmulator", "MotoServer", "assert_same", "free_port", "lightning_state", "mixed_state", "same", "tiny_model"]
