"""A model held as arrays in memory (a training script's tensors), sendable without a copy.

`ArraySource` offers the same `tensor_bytes` / `chunk_views` as a `ModelFile`, so the data
plane streams a trained model straight from the memory the training code left it in: a chunk
that crosses several tensors is sent as one view of each.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hauler.core.errors import JobError
from hauler.model.dtypes import numpy_dtype
from hauler.model.manifest import Chunk, Manifest
from hauler.model.plan import ChunkPlan

MAX_PROBLEMS_SHOWN = 5


class ArraySource:
    """Arrays laid out as `manifest` says (the caller has run `check_layout`), viewed as bytes;
    they must not change until sent."""

    def __init__(self, manifest: Manifest, arrays: Mapping[str, np.ndarray]) -> None:
        self.manifest = manifest
        self.plan = ChunkPlan(manifest)
        self._bytes = [_as_bytes(arrays[t.name]) for t in manifest.tensors]

    def tensor_bytes(self, index: int) -> memoryview:
        return self._bytes[index]

    def chunk_views(self, chunk: Chunk) -> list[memoryview]:
        """The chunk as one view per tensor piece, in order."""
        return [
            self._bytes[p.tensor][p.offset : p.offset + p.length] for p in self.plan.pieces(chunk)
        ]

    def payload_bytes(self, chunk: Chunk) -> int:
        return chunk.length

    def compute_digests(self) -> Manifest:
        self.manifest = self.manifest.digested(self.tensor_bytes)
        return self.manifest


def check_layout(manifest: Manifest, arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse arrays whose names, dtypes or shapes differ from the model's, naming each
    difference; a tied name may be left out, or must hold its tensor's values."""
    expected = {t.name: t for t in manifest.tensors}
    ties = dict(manifest.ties)
    known = expected.keys() | ties.keys()
    problems = [f"missing {name!r}" for name in expected if name not in arrays]
    problems += [f"unexpected {name!r}" for name in arrays if name not in known]
    for name, array in arrays.items():
        tensor = expected.get(name)
        if tensor is not None:
            problems += _mismatch(name, array, tensor.dtype, tensor.shape)
        elif name in ties and ties[name] in arrays:
            problems += _untied(name, array, ties[name], arrays[ties[name]])
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        raise JobError(
            f"the model sent does not match the one received: {shown}"
            + (f"; and {more} more" if more > 0 else "")
        )


def _mismatch(name: str, array: np.ndarray, dtype: str, shape: tuple[int, ...]) -> list[str]:
    if np.dtype(array.dtype) != numpy_dtype(dtype):
        return [f"{name!r} is {array.dtype}, the model's is {numpy_dtype(dtype)}"]
    if tuple(array.shape) != tuple(shape):
        return [f"{name!r} has shape {tuple(array.shape)}, the model's is {tuple(shape)}"]
    return []


def _untied(name: str, array: np.ndarray, target: str, stored: np.ndarray) -> list[str]:
    """A tied name sent with values of its own: fine only if they are its tensor's."""
    if np.shares_memory(array, stored) and array.shape == stored.shape:
        return []
    if array.shape == stored.shape and np.array_equal(array, stored):
        return []
    return [f"{name!r} is tied to {target!r} in the model, but was sent with other values"]


def _as_bytes(array: np.ndarray) -> memoryview:
    """The array's memory as flat bytes; only a non-contiguous array is copied."""
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
