"""The dtypes a model may hold: safetensors names on the wire, numpy dtypes in memory."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from hauler.core.errors import RemoteProtocolError

# safetensors dtype name -> numpy dtype. The allow-list for anything read from a peer or file.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a safetensors dtype name; refuses names off the allow-list."""
    try:
        return DTYPES[name]
    except KeyError:
        raise RemoteProtocolError(f"dtype {name!r} is not one of {sorted(DTYPES)}") from None


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype."""
    for name, known in DTYPES.items():
        if np.dtype(dtype) == known:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored; use one of {sorted(DTYPES)}")


def accumulator_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a weighted sum of this dtype is folded in: float32 for narrow floats, else
    float64."""
    if dtype.kind == "f" and dtype.itemsize <= 4 or dtype == DTYPES["BF16"]:
        return np.dtype("<f4")
    return np.dtype("<f8")
