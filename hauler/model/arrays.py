"""A model held as arrays in memory (a training script's tensors), sendable without a copy.

`ArraySource` offers the same `tensor_bytes` / `chunk_bytes` views as a `ModelFile`, so the
data plane streams a trained model straight from the memory the training code left it in.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hauler.core.errors import JobError
from hauler.model.dtypes import numpy_dtype
from hauler.model.manifest import Manifest


class ArraySource:
    """Arrays laid out as `manifest` says (the caller has run `check_layout`), viewed as bytes;
    they must not change until sent."""

    def __init__(self, manifest: Manifest, arrays: Mapping[str, np.ndarray]) -> None:
        self.manifest = manifest
        self._bytes = [_as_bytes(arrays[t.name]) for t in manifest.tensors]

    def tensor_bytes(self, index: int) -> memoryview:
        return self._bytes[index]

    def chunk_bytes(self, tensor: int, offset: int, length: int) -> memoryview:
        return self._bytes[tensor][offset : offset + length]

    def compute_digests(self) -> Manifest:
        self.manifest = self.manifest.digested(self.tensor_bytes)
        return self.manifest


def check_layout(manifest: Manifest, arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse arrays whose names, dtypes or shapes differ from the model's, naming each
    difference."""
    expected = {t.name: t for t in manifest.tensors}
    problems = [f"missing {name!r}" for name in expected if name not in arrays]
    problems += [f"unexpected {name!r}" for name in arrays if name not in expected]
    for name, array in arrays.items():
        tensor = expected.get(name)
        if tensor is None:
            continue
        if np.dtype(array.dtype) != numpy_dtype(tensor.dtype):
            problems.append(
                f"{name!r} is {array.dtype}, the model's is {numpy_dtype(tensor.dtype)}"
            )
        elif tuple(array.shape) != tuple(tensor.shape):
            problems.append(
                f"{name!r} has shape {tuple(array.shape)}, the model's is {tuple(tensor.shape)}"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise JobError(f"the model sent does not match the one received: {shown}")


def _as_bytes(array: np.ndarray) -> memoryview:
    """The array's memory as flat bytes; only a non-contiguous array is copied."""
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
