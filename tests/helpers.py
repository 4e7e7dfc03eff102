"""Shared test utilities (kept in asyncckpt.testing, which users can import too)."""

from asyncckpt.testing import assert_same, lightning_state, mixed_state, same, tiny_model

__all__ = ["assert_same", "lightning_state", "mixed_state", "same", "tiny_model"]
