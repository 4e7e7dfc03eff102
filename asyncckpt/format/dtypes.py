"""Which torch dtypes the format stores, by name, and their safetensors names."""

from __future__ import annotations

import torch

#: torch dtypes the format knows, by their manifest name (``str(dtype)`` without the ``torch.`` prefix).
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}
# quantized dtypes cannot be stored as raw bytes (they carry scales); such tensors take the pickle fallback.
for _name in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4"):
    DTYPES.pop(_name, None)

#: safetensors' own names for the dtypes it supports; any other dtype is stored as ``U8`` bytes.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64", torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16",
}

#: item sizes of the safetensors dtype names, for checking headers.
SAFETENSORS_ITEMSIZE: dict[str, int] = {name: d.itemsize for d, name in SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
