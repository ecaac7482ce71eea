"""FedAvg as a fold: each arriving chunk is multiply-added into a running weighted sum.

The sum lives in the next round's model file itself for float32/float64 tensors
(the file is pre-sized, so no extra copy of the model exists anywhere), and in a
side accumulator for the others (float16, bfloat16, integers), in RAM when it fits
`memory_budget_bytes`, else in a memory-mapped file. `finish` divides in place.

Exactness: floating-point folds cannot be undone exactly, so a contribution that
stops part-way (its site died mid-upload) marks the aggregate `tainted`; the caller
then `restart`s it and folds the completed contributions again from their sites.
Nothing of a failed site can reach a finished model (docs/design.md, "Aggregation").

Deltas: a site may send its update minus the global model it received. The fold is the
same; `finish` then adds (total weight of the deltas) x the base model once, so
sum(w x model) = sum(w x (base + delta)) and sites may mix both forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from hauler.aggregate.screening import FiniteCheck, UpdateNorms, squares
from hauler.core.errors import JobError, LocalProtocolError
from hauler.model import (
    Chunk,
    ChunkPlan,
    Manifest,
    ModelFile,
    TensorEntry,
    accumulator_dtype,
    numpy_dtype,
)

BLOCK_ELEMENTS = 1 << 20  # multiply-add in blocks with reused scratch: no large temporaries


class ChunkSource(Protocol):
    def chunk_bytes(self, tensor: int, offset: int, length: int) -> memoryview: ...


@dataclass(frozen=True)
class AggregateStatistics:
    contributions: int
    total_weight: float
    side_accumulator_bytes: int
    file_backed: bool


class FedAvg:
    """Weighted average of same-layout models, folded chunk by chunk as they arrive."""

    def __init__(self, manifest: Manifest, *, workdir: Path, memory_budget_bytes: int) -> None:
        self.manifest = manifest
        self.plan = ChunkPlan(manifest)
        self._dtypes = [accumulator_dtype(numpy_dtype(t.dtype)) for t in manifest.tensors]
        self._in_place = [numpy_dtype(t.dtype) == d for t, d in zip(manifest.tensors, self._dtypes)]
        sizes = [
            0 if in_place else t.length // t.itemsize * d.itemsize
            for t, d, in_place in zip(manifest.tensors, self._dtypes, self._in_place)
        ]
        self._side_offsets, side_bytes = _pack(sizes)
        self.file_backed = side_bytes > memory_budget_bytes
        self._side = _allocate(
            side_bytes, workdir / "accumulator.bin" if self.file_backed else None
        )
        self._scratch = {dtype: np.empty(BLOCK_ELEMENTS, dtype) for dtype in set(self._dtypes)}
        self._float = [
            numpy_dtype(t.dtype).kind == "f" or t.dtype == "BF16" for t in manifest.tensors
        ]
        self._finite = FiniteCheck(BLOCK_ELEMENTS)
        self.norms = UpdateNorms(self.plan.total)
        self._touched = bytearray(self.plan.total)  # 1 once a chunk holds a partial sum
        self._accumulators: list[np.ndarray] = []
        self._output: ModelFile | None = None
        self._base: ModelFile | None = None
        self.total_weight = 0.0
        self.delta_weight = 0.0
        self.contributions = 0
        self.tainted = False

    def begin(self, output: ModelFile, base: ModelFile | None = None) -> None:
        """Start a round whose result will be written into `output` (same layout, writable);
        `base` is the model the round started from, which deltas are relative to."""
        for model in (output, base):
            if model is not None and not model.manifest.same_layout(self.manifest):
                raise LocalProtocolError(
                    "output or base file's layout differs from the aggregate's"
                )
        self._output, self._base = output, base
        self._accumulators = [
            self._accumulator(index) for index in range(len(self.manifest.tensors))
        ]
        self.norms.restart()
        self.restart()

    def restart(self) -> None:
        """Forget every fold of this round (after a taint); the memory is kept."""
        self._touched[:] = bytes(len(self._touched))
        self.total_weight, self.delta_weight, self.contributions, self.tainted = 0.0, 0.0, 0, False

    def _accumulator(self, index: int) -> np.ndarray:
        assert self._output is not None
        if self._in_place[index]:
            return self._output.array(index).reshape(-1)
        tensor, dtype = self.manifest.tensors[index], self._dtypes[index]
        return np.frombuffer(
            self._side, dtype, tensor.length // tensor.itemsize, self._side_offsets[index]
        )

    def contribution(
        self, weight: float, *, delta: bool = False, max_update_norm: float | None = None
    ) -> Contribution:
        """A site's update to fold; `max_update_norm` bounds its norm relative to the base
        model's."""
        if not 0 < weight < float("inf"):
            raise ValueError(f"weight must be finite and positive, got {weight}")
        if (delta or max_update_norm is not None) and self._base is None:
            raise LocalProtocolError(
                "deltas and norms need the round's base model: begin(output, base)"
            )
        return Contribution(self, weight, delta, max_update_norm)

    def fold(self, chunk: Chunk, data: memoryview, weight: float) -> None:
        """Add `weight` x the chunk's values into the sum (the first fold of a chunk just
        writes)."""
        tensor = self.manifest.tensors[chunk.tensor]
        values = np.frombuffer(data, numpy_dtype(tensor.dtype))
        start = chunk.offset // tensor.itemsize
        target = self._accumulators[chunk.tensor][start : start + values.size]
        first = not self._touched[chunk.seq]
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
            self._fold_blocks(chunk, values, target, weight, first)
        self._touched[chunk.seq] = 1

    def _fold_blocks(
        self, chunk: Chunk, values: np.ndarray, target: np.ndarray, weight: float, first: bool
    ) -> None:
        for block in range(0, values.size, BLOCK_ELEMENTS):
            into, source = (
                target[block : block + BLOCK_ELEMENTS],
                values[block : block + BLOCK_ELEMENTS],
            )
            if first:
                np.multiply(source, weight, out=into, dtype=into.dtype, casting="unsafe")
            else:
                scratch = self._scratch[into.dtype][: into.size]
                np.multiply(source, weight, out=scratch, dtype=scratch.dtype, casting="unsafe")
                np.add(into, scratch, out=into)
            if self._float[chunk.tensor]:
                self._finite.check_folded(into, self.manifest, chunk)

    def screen(self, source: ChunkSource, *, delta: bool, max_update_norm: float | None) -> None:
        """Check a whole update before any of it is folded, where it is at hand (the simulator):
        every value finite, and its norm within `max_update_norm`. Raises UpdateRefused."""
        total = 0.0
        for chunk in self.manifest.chunks():
            data = source.chunk_bytes(chunk.tensor, chunk.offset, chunk.length)
            if self._float[chunk.tensor]:
                values = np.frombuffer(data, numpy_dtype(self.manifest.tensors[chunk.tensor].dtype))
                for block in range(0, values.size, BLOCK_ELEMENTS):
                    self._finite.check_folded(
                        values[block : block + BLOCK_ELEMENTS], self.manifest, chunk
                    )
            if max_update_norm is not None:
                total += self.update_squares(chunk, data, delta)
        if max_update_norm is not None:
            self.norms.check(total, max_update_norm, complete=True)

    def update_squares(self, chunk: Chunk, data: memoryview, delta: bool) -> float:
        """Sum of squares of a chunk's update (the chunk itself if `delta`, else it minus the
        base model's), measuring the base model's chunk on the way if not done this round."""
        if not self._float[chunk.tensor]:
            return 0.0
        assert self._base is not None
        tensor = self.manifest.tensors[chunk.tensor]
        values = np.frombuffer(data, numpy_dtype(tensor.dtype))
        start = chunk.offset // tensor.itemsize
        base = self._base.array(chunk.tensor).reshape(-1)[start : start + values.size]
        measure = not self.norms.measured(chunk.seq)
        total = base_total = 0.0
        for block in range(0, values.size, BLOCK_ELEMENTS):
            scratch = self._scratch[self._dtypes[chunk.tensor]][
                : min(BLOCK_ELEMENTS, values.size - block)
            ]
            source, reference = (
                values[block : block + scratch.size],
                base[block : block + scratch.size],
            )
            if measure:
                np.copyto(scratch, reference, casting="unsafe")
                base_total += squares(scratch)
            if delta:
                np.copyto(scratch, source, casting="unsafe")
            else:
                np.subtract(source, reference, out=scratch, dtype=scratch.dtype, casting="unsafe")
            total += squares(scratch)
        if measure:
            self.norms.add_base(chunk.seq, base_total)
        return total

    def fold_model(self, model: ModelFile, weight: float) -> None:
        """Fold a whole local model file (every chunk in plan order)."""
        contribution = self.contribution(weight)
        for chunk in self.manifest.chunks():
            contribution.fold(chunk, model.chunk_bytes(chunk.tensor, chunk.offset, chunk.length))
        contribution.complete()

    @np.errstate(over="ignore", invalid="ignore")  # an overflow is refused by _check_average
    def finish(self) -> Manifest:
        """Divide by the total weight in place, fill `output`, hash it; returns its manifest."""
        if self._output is None or not self.contributions or self.tainted:
            raise LocalProtocolError(
                "finish() needs a clean aggregate with at least one contribution"
            )
        scale = 1.0 / self.total_weight
        for index, tensor in enumerate(self.manifest.tensors):
            accumulator, target = self._accumulators[index], self._output.array(index).reshape(-1)
            base = (
                self._base.array(index).reshape(-1)
                if self.delta_weight and self._base is not None
                else None
            )
            integral = numpy_dtype(tensor.dtype).kind in "iub"
            for start in range(0, accumulator.size, BLOCK_ELEMENTS):
                block = accumulator[start : start + BLOCK_ELEMENTS]
                if base is not None:
                    scratch = self._scratch[block.dtype][: block.size]
                    np.multiply(
                        base[start : start + BLOCK_ELEMENTS],
                        self.delta_weight,
                        out=scratch,
                        dtype=scratch.dtype,
                        casting="unsafe",
                    )
                    np.add(block, scratch, out=block)
                np.multiply(block, scale, out=block)
                if integral:
                    np.rint(block, out=block)
                if not self._in_place[index]:
                    target[start : start + BLOCK_ELEMENTS] = block
                if self._float[index]:
                    self._check_average(target[start : start + BLOCK_ELEMENTS], tensor)
        return self._output.compute_digests()

    def _check_average(self, values: np.ndarray, tensor: TensorEntry) -> None:
        """Every fold was finite, yet the average may not be once cast back (float16) or rebased."""
        if not self._finite.all_finite(values):
            raise JobError(
                f"the average of tensor {tensor.name!r} overflows {tensor.dtype}; set "
                "[workflow] max_update_norm to bound what sites may send"
            )

    def statistics(self) -> AggregateStatistics:
        return AggregateStatistics(
            self.contributions, self.total_weight, len(self._side), self.file_backed
        )


class Contribution:
    """One site's update being folded; `complete` it, or `abandon` it (which taints if it
    folded)."""

    def __init__(
        self,
        aggregate: FedAvg,
        weight: float,
        delta: bool = False,
        max_update_norm: float | None = None,
    ) -> None:
        self.aggregate, self.weight, self.delta = aggregate, weight, delta
        self.max_update_norm = max_update_norm
        self.update_squares = 0.0
        self.folded_chunks = 0
        self.finished = False

    def fold(self, chunk: Chunk, data: memoryview) -> None:
        """Fold one chunk; raises UpdateRefused (nothing more may be folded) if it breaks a
        check."""
        if self.finished:
            raise LocalProtocolError("fold after the contribution ended")
        if self.max_update_norm is not None:
            self.update_squares += self.aggregate.update_squares(chunk, data, self.delta)
            self.aggregate.norms.check(self.update_squares, self.max_update_norm, complete=False)
        try:
            self.aggregate.fold(chunk, data, self.weight)
        except BaseException:
            self.aggregate.tainted = True  # part of the chunk may be in the sum already
            self.finished = True
            raise
        self.folded_chunks += 1

    def complete(self) -> None:
        if self.folded_chunks != self.aggregate.plan.total:
            raise LocalProtocolError(
                f"{self.folded_chunks} of {self.aggregate.plan.total} chunks folded"
            )
        if self.max_update_norm is not None:
            self.aggregate.norms.check(self.update_squares, self.max_update_norm, complete=True)
        self.finished = True
        self.aggregate.total_weight += self.weight
        self.aggregate.delta_weight += self.weight if self.delta else 0.0
        self.aggregate.contributions += 1

    def abandon(self) -> None:
        """The update will never complete: if any of it was folded, the round's sum is tainted."""
        if not self.finished and self.folded_chunks:
            self.aggregate.tainted = True
        self.finished = True


def _pack(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets that keep every side accumulator 8-byte aligned, and the total size."""
    offsets, position = [], 0
    for size in sizes:
        offsets.append(position)
        position += -(-size // 8) * 8
    return offsets, position


def _allocate(size: int, path: Path | None) -> memoryview:
    if path is None or size == 0:
        return memoryview(bytearray(size))
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "r+" if path.exists() and path.stat().st_size == size else "w+"
    return memoryview(np.memmap(path, np.uint8, mode, shape=(size,)))
