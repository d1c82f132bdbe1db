"""safetensors dtype names -> torch and numpy dtypes.

Every safetensors dtype that torch has maps to that torch dtype. Types a
library lacks (numpy has no bf16 or float8; neither has the packed F4/F6)
come back as raw unsigned integers of the same width, with the real
safetensors name reported next to them.
"""

# name -> (bits per element, raw stand-in numpy dtype name)
SAFETENSORS_DTYPES = {
    "BOOL": (8, "bool"), "U8": (8, "uint8"), "I8": (8, "int8"),
    "I16": (16, "int16"), "U16": (16, "uint16"), "F16": (16, "float16"), "BF16": (16, "uint16"),
    "I32": (32, "int32"), "U32": (32, "uint32"), "F32": (32, "float32"),
    "F64": (64, "float64"), "I64": (64, "int64"), "U64": (64, "uint64"), "C64": (64, "complex64"),
    "F8_E4M3": (8, "uint8"), "F8_E5M2": (8, "uint8"), "F8_E4M3FNUZ": (8, "uint8"),
    "F8_E5M2FNUZ": (8, "uint8"), "F8_E8M0": (8, "uint8"),
    # Packed sub-byte types: exposed as their raw bytes.
    "F4": (4, "uint8"), "F6_E2M3": (6, "uint8"), "F6_E3M2": (6, "uint8"),
}

# Names numpy represents exactly; the others are raw stand-ins.
_NUMPY_EXACT = {"BOOL", "U8", "I8", "I16", "U16", "F16", "I32", "U32", "F32", "F64", "I64", "U64", "C64"}

_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "F64": "float64", "I64": "int64", "U64": "uint64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}

# torch dtype name -> the broker's cast names (attach(dtype=...)).
CAST_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32",
              "bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "half": "fp16", "float": "fp32"}


def torch_dtype(name):
    """The torch dtype for a safetensors name, or None when this torch lacks it."""
    import torch
    attr = _TORCH_NAMES.get(name)
    return getattr(torch, attr, None) if attr else None


def numpy_dtype(name):
    """(numpy dtype, exact): the stand-in is raw bytes when exact is False."""
    import numpy as np
    if name not in SAFETENSORS_DTYPES:
        raise ValueError(f"unknown safetensors dtype {name!r}")
    return np.dtype(SAFETENSORS_DTYPES[name][1]), name in _NUMPY_EXACT


def cast_name(dtype):
    """The broker's cast name for a torch dtype or a string ("bf16", "float16", ...)."""
    if dtype is None or dtype == "auto":
        return None
    key = str(dtype).replace("torch.", "")
    if key not in CAST_NAMES:
        raise ValueError(f"the broker can cast to bfloat16, float16 or float32, not {dtype!r}")
    return CAST_NAMES[key]
