"""numpy arrays to and from framework tensors, sharing memory: no model-sized copies.

PyTorch is optional (`pip install 'hauler[torch]'`). bfloat16 has no numpy dtype of its own,
so it crosses as int16 bits and is re-viewed on the other side (ml_dtypes on the numpy side).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from hauler.core.errors import ConfigError, JobError
from hauler.model import dtype_name


def to_numpy(model: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """numpy arrays as they are; torch tensors as numpy views of their memory (GPU tensors are
    copied to CPU)."""
    arrays = {}
    for name, value in model.items():
        if isinstance(value, np.ndarray):
            arrays[name] = value
        elif type(value).__module__.startswith("torch"):
            arrays[name] = _torch_to_numpy(value)
        else:
            raise JobError(
                f"{name!r} is a {type(value).__name__}; send numpy arrays or torch tensors"
            )
    return arrays


def layout_of(model: Mapping[str, Any]) -> list[tuple]:
    """A model module's `layout(config)` from a state_dict (numpy arrays or torch tensors):
    `(name, dtype, shape)` per tensor, and `(name, dtype, shape, other)` for a name whose tensor
    shares its memory with `other`'s (tied weights, such as GPT-2's lm_head and wte), which
    Hauler then stores, sends and folds once and hands back tied."""
    rows: list[tuple] = []
    first: dict[tuple, str] = {}
    for name, array in to_numpy(model).items():
        row = (name, dtype_name(array.dtype), tuple(array.shape))
        key = (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str)
        if array.size and key in first:
            rows.append((*row, first[key]))
        else:
            first.setdefault(key, name)
            rows.append(row)
    return rows


def to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """torch tensors viewing the arrays' memory (writes go through to it)."""
    torch = _import_torch()
    return {
        name: (
            torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
            if array.dtype == ml_dtypes.bfloat16
            else torch.from_numpy(array)
        )
        for name, array in arrays.items()
    }


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ConfigError("PyTorch is not installed here: pip install 'hauler[torch]'") from None
    return torch


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    torch = _import_torch()
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
