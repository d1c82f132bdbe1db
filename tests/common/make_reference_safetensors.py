#!/usr/bin/env python3
"""wbroker tests: reference safetensors files and verdicts from the `safetensors` package.

  make_reference_safetensors.py write OUT_DIR
      Writes one file per dtype: numpy-backed dtypes with safetensors.numpy.save_file
      (the reference writer), the others (BF16, F8_*, F4, F6_*) as raw bytes.
      Every file is read back with safe_open/deserialize (the reference reader)
      and what they report is dumped to OUT_DIR/reference.json:
      {"files": [{"file", "metadata", "tensors": [{"name", "dtype", "shape", "data_hex"}]}]}

  make_reference_safetensors.py check FILE...
      Prints a JSON object FILE -> "ok" or the reference's error message.
"""

import json
import os
import struct
import sys

import numpy as np
from safetensors import deserialize, safe_open
from safetensors.numpy import save_file

# numpy dtype of each safetensors dtype that safetensors.numpy can save.
NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "F16": np.float16,
    "I32": np.int32,
    "U32": np.uint32,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "U64": np.uint64,
    "C64": np.complex64,
}

# Element bits of the dtypes numpy lacks.
RAW_DTYPE_BITS = {
    "BF16": 16,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def numpy_tensors(name, np_dtype):
    rng = np.random.default_rng(sum(map(ord, name)))
    raw = rng.integers(0, 256, size=2 * 3 * 8, dtype=np.uint8)
    if np_dtype is np.bool_:
        matrix = (raw[:6] & 1).astype(np.bool_).reshape(2, 3)
    else:
        itemsize = np.dtype(np_dtype).itemsize
        matrix = raw[: 6 * itemsize].view(np_dtype).reshape(2, 3)
    return {
        "matrix": matrix,
        "scalar": np.zeros((), dtype=np_dtype),
        "empty": np.zeros((0, 3), dtype=np_dtype),
        "vector": np.ones(5, dtype=np_dtype),
    }


def write_raw(path, dtype, bits, metadata):
    # 8 elements are byte-whole for every dtype (F4: 4 bytes, F6: 6 bytes).
    shapes = {"matrix": [2, 4], "empty": [0, 3], "vector": [8]}
    if bits % 8 == 0:
        shapes["scalar"] = []
    header = {"__metadata__": metadata}
    data = b""
    for i, (name, shape) in enumerate(shapes.items()):
        count = 1
        for d in shape:
            count *= d
        nbytes = count * bits // 8
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + nbytes],
        }
        data += bytes((17 * i + 3 * k + 1) & 0xFF for k in range(nbytes))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def describe(path):
    """What the reference reader reports for one file."""
    with safe_open(path, "np") as f:
        metadata = f.metadata()
        slices = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    with open(path, "rb") as f:
        contents = deserialize(f.read())
    tensors = []
    for name, view in contents:
        dtype, shape = slices[name]
        assert dtype == view["dtype"] and list(shape) == list(view["shape"]), name
        tensors.append(
            {"name": name, "dtype": dtype, "shape": list(shape), "data_hex": bytes(view["data"]).hex()}
        )
    tensors.sort(key=lambda t: t["name"])
    return {"file": os.path.basename(path), "metadata": metadata, "tensors": tensors}


def write(out_dir):
    files = []
    for dtype, np_dtype in NUMPY_DTYPES.items():
        path = os.path.join(out_dir, f"np_{dtype}.safetensors")
        metadata = {"format": "np", "dtype": dtype, "note": "caf\u00e9 \u4e2d"}
        save_file(numpy_tensors(dtype, np_dtype), path, metadata=metadata)
        files.append(describe(path))
    for dtype, bits in RAW_DTYPE_BITS.items():
        path = os.path.join(out_dir, f"raw_{dtype}.safetensors")
        write_raw(path, dtype, bits, {"format": "raw", "dtype": dtype})
        files.append(describe(path))
    # Several dtypes in one file, written by the reference writer, no metadata.
    path = os.path.join(out_dir, "np_mixed.safetensors")
    save_file(
        {
            "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
            "b.bias": np.arange(3, dtype=np.int64),
            "c.mask": np.array([True, False, True]),
            "d.half": np.ones((2, 2, 2), dtype=np.float16),
        },
        path,
    )
    files.append(describe(path))
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump({"files": files}, f)


def check(paths):
    verdicts = {}
    for path in paths:
        try:
            describe(path)
            verdicts[path] = "ok"
        except Exception as e:  # the reference raises SafetensorError and others
            verdicts[path] = f"{type(e).__name__}: {e}"
    print(json.dumps(verdicts))


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "write":
        write(sys.argv[2])
    elif len(sys.argv) >= 2 and sys.argv[1] == "check":
        check(sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
