"""The on-disk format, pure (no I/O): typed manifest records, the structure encoding, safetensors headers.

docs/format.md is the specification; everything here is what both the writer and the reader rely on.
"""
