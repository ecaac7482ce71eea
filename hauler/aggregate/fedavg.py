"""FedAvg as a fold: a running weighted sum, one contribution at a time, then one division.

Memory is one accumulator (in RAM when it fits `memory_budget_bytes`, else a
memory-mapped file that is pre-sized once and reused every round) plus one block
of scratch. A contribution is folded only once its upload is complete and every
tensor has matched its digest, so a site that fails mid-upload has folded nothing:
its discard is exact by construction (docs/design.md, "Aggregation").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hauler.core.errors import LocalProtocolError
from hauler.model import Manifest, ModelFile, accumulator_dtype, numpy_dtype

BLOCK_ELEMENTS = 1 << 20  # multiply-add in blocks with reused scratch: no model-sized temporary


@dataclass(frozen=True)
class AggregateStatistics:
    contributions: int
    total_weight: float
    accumulator_bytes: int
    file_backed: bool


class FedAvg:
    """Weighted average of same-layout models: `fold` each, then `finish` into a model file."""

    def __init__(self, manifest: Manifest, *, workdir: Path, memory_budget_bytes: int) -> None:
        self.manifest = manifest
        self._dtypes = [accumulator_dtype(numpy_dtype(t.dtype)) for t in manifest.tensors]
        self._offsets, size = _pack([t.length // t.itemsize * d.itemsize for t, d in zip(manifest.tensors, self._dtypes)])
        self.file_backed = size > memory_budget_bytes
        self._storage = _allocate(size, workdir / "accumulator.bin" if self.file_backed else None)
        self._scratch = {dtype: np.empty(BLOCK_ELEMENTS, dtype) for dtype in set(self._dtypes)}
        self._lock = threading.Lock()
        self.total_weight = 0.0
        self.contributions = 0

    def _accumulator(self, index: int) -> np.ndarray:
        tensor, dtype = self.manifest.tensors[index], self._dtypes[index]
        count = tensor.length // tensor.itemsize
        return np.frombuffer(self._storage, dtype, count, self._offsets[index])

    def fold(self, model: ModelFile, weight: float) -> None:
        """Add `weight` x every tensor of `model` to the running sum (thread-safe, serialised)."""
        if not model.manifest.same_layout(self.manifest):
            raise LocalProtocolError("contribution's layout differs from the aggregate's")
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        with self._lock:
            first = self.contributions == 0
            for index in range(len(self.manifest.tensors)):
                self._fold_tensor(index, model.array(index).reshape(-1), weight, first)
            self.total_weight += weight
            self.contributions += 1

    def _fold_tensor(self, index: int, values: np.ndarray, weight: float, first: bool) -> None:
        acc = self._accumulator(index)
        for start in range(0, acc.size, BLOCK_ELEMENTS):
            block, source = acc[start : start + BLOCK_ELEMENTS], values[start : start + BLOCK_ELEMENTS]
            if first:
                np.multiply(source, weight, out=block, casting="unsafe")
            else:
                scratch = self._scratch[block.dtype][: block.size]
                np.multiply(source, weight, out=scratch, casting="unsafe")
                np.add(block, scratch, out=block)

    def finish(self, out: ModelFile) -> Manifest:
        """Write sum / total weight into `out` (same layout), hash it, and return its manifest."""
        if not self.contributions:
            raise LocalProtocolError("finish() with no contribution folded")
        scale = 1.0 / self.total_weight
        with self._lock:
            for index, tensor in enumerate(self.manifest.tensors):
                acc, target = self._accumulator(index), out.array(index).reshape(-1)
                integral = numpy_dtype(tensor.dtype).kind in "iub"
                for start in range(0, acc.size, BLOCK_ELEMENTS):
                    block = acc[start : start + BLOCK_ELEMENTS]
                    np.multiply(block, scale, out=block)
                    if integral:
                        np.rint(block, out=block)
                    target[start : start + BLOCK_ELEMENTS] = block
        out.flush()
        return out.compute_digests()

    def reset(self) -> None:
        """Start a new round; the accumulator's memory is kept for reuse."""
        self.total_weight = 0.0
        self.contributions = 0

    def statistics(self) -> AggregateStatistics:
        return AggregateStatistics(self.contributions, self.total_weight, len(self._storage), self.file_backed)


def _pack(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets that keep every accumulator 8-byte aligned, and the total size."""
    offsets, position = [], 0
    for size in sizes:
        offsets.append(position)
        position += -(-size // 8) * 8
    return offsets, position


def _allocate(size: int, path: Path | None) -> memoryview:
    if path is None or size == 0:
        return memoryview(bytearray(size))
    path.parent.mkdir(parents=True, exist_ok=True)
    return memoryview(np.memmap(path, np.uint8, "w+" if not path.exists() or path.stat().st_size != size else "r+", shape=(size,)))
