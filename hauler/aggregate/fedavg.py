"""FedAvg as a fold: each arriving chunk is multiply-added into a running weighted sum.

A chunk is a byte range of the model and may hold pieces of several tensors; each piece is
folded into its tensor's accumulator. The sum lives in the next round's model file itself for
float32/float64 tensors (the file is pre-sized, so no extra copy of the model exists
anywhere), and in a side accumulator for the others (float16 and bfloat16 in float32,
integers and flags in float64), in RAM when it fits `memory_budget_bytes`, else in a
memory-mapped file. `finish` (aggregate/finish.py) turns the sums into the next model.

Exactness: floating-point folds cannot be undone exactly, so a contribution that stops
part-way (its site died mid-upload) marks the aggregate `tainted`; the caller then `restart`s
it and folds the completed contributions again from their sites. Nothing of a failed site
can reach a finished model (docs/design.md, "Aggregation").

Updates: a site may send its float tensors as an update (its model minus the global model it
received: what codecs compress) and its other tensors as values, always. The fold is the
same; the float sum then mixes models (weight `full_weight`) and updates, and
`pseudo_gradient` recovers the averaged update from it: sum / W - base x full_weight / W.
Non-float tensors follow their policy (aggregate/integers.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hauler.aggregate import integers
from hauler.aggregate.screening import FiniteCheck, UpdateNorms, non_finite, squares
from hauler.core.errors import LocalProtocolError
from hauler.model import (
    Chunk,
    ChunkPlan,
    Manifest,
    ModelFile,
    Piece,
    Run,
    Span,
    accumulator_dtype,
    is_float,
    numpy_dtype,
)

BLOCK_ELEMENTS = 1 << 20  # multiply-add in blocks with reused scratch: no large temporaries
PieceValues = Sequence[tuple[Piece, np.ndarray]]


class FedAvg:
    """Weighted average of same-layout models, folded chunk by chunk as they arrive."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        workdir: Path,
        memory_budget_bytes: int,
        integer_policies: Sequence[str] | None = None,
    ) -> None:
        self.manifest = manifest
        self.plan = ChunkPlan(manifest)
        tensors = manifest.tensors
        self.policies = list(integer_policies or [integers.DEFAULT_POLICY] * len(tensors))
        self.dtypes = [accumulator_dtype(numpy_dtype(t.dtype)) for t in tensors]
        self.floating = [is_float(t.dtype) for t in tensors]
        self.in_place = [numpy_dtype(t.dtype) == d for t, d in zip(tensors, self.dtypes)]
        sizes = [
            0 if in_place else t.length // t.itemsize * d.itemsize
            for t, d, in_place in zip(tensors, self.dtypes, self.in_place)
        ]
        self._side_offsets, side_bytes = _pack(sizes)
        self.file_backed = side_bytes > memory_budget_bytes
        side_path = workdir / "accumulator.bin" if self.file_backed else None
        self._side = _allocate(side_bytes, side_path)
        self._scratch = {dtype: np.empty(BLOCK_ELEMENTS, dtype) for dtype in set(self.dtypes)}
        self._scratch.setdefault(np.dtype("<f8"), np.empty(BLOCK_ELEMENTS, np.float64))
        self.finite = FiniteCheck(BLOCK_ELEMENTS)
        self.norms = UpdateNorms(self.plan.total)
        self._touched = bytearray(self.plan.total)  # 1 once a chunk holds a partial sum
        self._accumulators: dict[int, np.ndarray] = {}
        self.output: ModelFile | None = None
        self.base: ModelFile | None = None
        self.total_weight = 0.0
        self.update_weight = 0.0
        self.contributions = 0
        self.tainted = False

    def begin(self, output: ModelFile, base: ModelFile | None = None) -> None:
        """Start a round whose result will be written into `output` (same layout, writable);
        `base` is the model the round started from, which updates are relative to."""
        for model in (output, base):
            if model is not None and not model.manifest.same_layout(self.manifest):
                raise LocalProtocolError(
                    "output or base file's layout differs from the aggregate's"
                )
        self.output, self.base = output, base
        self._accumulators = {
            i: self._accumulator(i)
            for i in range(len(self.manifest.tensors))
            if not self.in_place[i]
        }  # float32/64 sums are read as regions of the output file
        self.norms.restart()
        self.restart()

    def restart(self) -> None:
        """Forget every fold of this round (after a taint); the memory is kept."""
        self._touched[:] = bytes(len(self._touched))
        self.total_weight, self.update_weight, self.contributions = 0.0, 0.0, 0
        self.tainted = False

    @property
    def full_weight(self) -> float:
        """The weight of the contributions sent as whole models."""
        return self.total_weight - self.update_weight

    def _accumulator(self, index: int) -> np.ndarray:
        tensor, dtype = self.manifest.tensors[index], self.dtypes[index]
        count = tensor.length // tensor.itemsize
        return np.frombuffer(self._side, dtype, count, self._side_offsets[index])

    def accumulated(self, span: Span) -> np.ndarray:
        """The running sum of a piece, or of a run of tensors summed in the output file itself
        (in the accumulator dtype)."""
        if self.in_place[span.tensor]:
            assert self.output is not None
            return self._region(self.output, span, self.dtypes[span.tensor])
        assert isinstance(span, Piece), "a side accumulator is kept per tensor"
        start = span.offset // self.manifest.tensors[span.tensor].itemsize
        return self._accumulators[span.tensor][start : start + self.plan.count(span)]

    def based(self, span: Span) -> np.ndarray:
        """The round's global model's values of a piece or run."""
        assert self.base is not None
        return self._region(self.base, span, self.plan.dtype(span))

    def _region(self, model: ModelFile, span: Span, dtype: np.dtype) -> np.ndarray:
        view = model.region(self.plan.data_offset(span), span.length)
        return np.frombuffer(view, dtype)

    def contribution(
        self, weight: float, *, update: bool = False, max_update_norm: float | None = None
    ) -> Contribution:
        """A site's model (or update) to fold; `max_update_norm` bounds its norm relative to the
        base model's."""
        if not 0 < weight < float("inf"):
            raise ValueError(f"weight must be finite and positive, got {weight}")
        if self.base is None and (update or max_update_norm is not None or self._needs_base()):
            raise LocalProtocolError(
                "updates, norms and integer policies need the round's base model: "
                "begin(output, base)"
            )
        return Contribution(self, weight, update, max_update_norm)

    def _needs_base(self) -> bool:
        return any(p in ("sum", "keep") for p, f in zip(self.policies, self.floating) if not f)

    def fold(self, chunk: Chunk, values: PieceValues, weight: float) -> None:
        """Add `weight` x each run's values into its sum (the first fold of a chunk writes):
        a run of float tensors summed in the output file at once, the others piece by piece."""
        first = not self._touched[chunk.seq]
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
            for run, array in values:
                if self.floating[run.tensor] and self.in_place[run.tensor]:
                    self._fold_float(chunk, run, array, weight, first)
                    continue
                for piece, part in run.split(array):
                    if self.floating[piece.tensor]:
                        self._fold_float(chunk, piece, part, weight, first)
                    else:
                        self._fold_policy(piece, part, weight, first)
        self._touched[chunk.seq] = 1

    def _fold_float(
        self, chunk: Chunk, span: Span, values: np.ndarray, weight: float, first: bool
    ) -> None:
        target = self.accumulated(span)
        for block in range(0, values.size, BLOCK_ELEMENTS):
            into = target[block : block + BLOCK_ELEMENTS]
            source = values[block : block + BLOCK_ELEMENTS]
            if first:
                np.multiply(source, weight, out=into, dtype=into.dtype, casting="unsafe")
            else:
                scratch = self._scratch[into.dtype][: into.size]
                np.multiply(source, weight, out=scratch, dtype=scratch.dtype, casting="unsafe")
                np.add(into, scratch, out=into)
            if not self.finite.all_finite(into):
                raise self._non_finite(chunk, span, into, block)

    def _non_finite(self, chunk: Chunk, span: Span, block: np.ndarray, start: int) -> Exception:
        """The refusal naming the tensor that holds the first non-finite value of `block`."""
        element = start + int(np.flatnonzero(~np.isfinite(block))[0])
        piece = span.piece_at(element) if isinstance(span, Run) else span
        return non_finite(self.manifest.tensors[piece.tensor].name, chunk)

    def _fold_policy(self, piece: Piece, values: np.ndarray, weight: float, first: bool) -> None:
        policy, target = self.policies[piece.tensor], self.accumulated(piece)
        base = self.based(piece) if self.base is not None else values
        scratch = self._scratch[np.dtype("<f8")]
        for block in range(0, values.size, BLOCK_ELEMENTS):
            part = slice(block, block + BLOCK_ELEMENTS)
            integers.fold(policy, target[part], values[part], base[part], weight, first, scratch)

    def update_squares(self, values: PieceValues, update: bool) -> float:
        """Sum of squares of a chunk's update (its float runs themselves if `update`, else
        minus the base model's)."""
        return sum(
            (self._squares(run, v, update) for run, v in values if self.floating[run.tensor]),
            0.0,
        )

    def _squares(self, span: Span, values: np.ndarray, update: bool) -> float:
        base = self.based(span)
        total = 0.0
        for block in range(0, values.size, BLOCK_ELEMENTS):
            scratch = self._scratch[self.dtypes[span.tensor]][
                : min(BLOCK_ELEMENTS, values.size - block)
            ]
            source = values[block : block + scratch.size]
            if update:
                np.copyto(scratch, source, casting="unsafe")
            else:
                reference = base[block : block + scratch.size]
                np.subtract(source, reference, out=scratch, dtype=scratch.dtype, casting="unsafe")
            total += squares(scratch)
        return total

    def measure_base(self, chunk: Chunk) -> None:
        """The global model's squares over `chunk`, once per round, for max_update_norm."""
        if self.norms.measured(chunk.seq):
            return
        total = 0.0
        for run in self.plan.runs(chunk):
            if self.floating[run.tensor]:
                total += self._squares(run, self.based(run), update=True)
        self.norms.add_base(chunk.seq, total)

    def fold_model(self, model: ModelFile, weight: float) -> None:
        """Fold a whole local model file (every chunk in plan order)."""
        contribution = self.contribution(weight)
        for chunk in self.manifest.chunks():
            contribution.fold(chunk, self.plan.arrays(chunk, model.chunk_view(chunk)))
        contribution.complete()

    def scratch(self, dtype: np.dtype, size: int) -> np.ndarray:
        """A reused scratch block (at most BLOCK_ELEMENTS) of `dtype` for the finish."""
        key = np.dtype(dtype)
        if key not in self._scratch:  # not setdefault: its default would be allocated every call
            self._scratch[key] = np.empty(BLOCK_ELEMENTS, key)
        return self._scratch[key][:size]


class Contribution:
    """One site's model or update being folded; `complete` it, or `abandon` it (which taints
    if it folded)."""

    def __init__(
        self,
        aggregate: FedAvg,
        weight: float,
        update: bool = False,
        max_update_norm: float | None = None,
    ) -> None:
        self.aggregate, self.weight, self.update = aggregate, weight, update
        self.max_update_norm = max_update_norm
        self.update_squares = 0.0
        self.folded_chunks = 0
        self.finished = False

    def fold(self, chunk: Chunk, values: PieceValues) -> None:
        """Fold one chunk (its pieces' values); raises UpdateRefused (nothing more may be folded)
        if it breaks a check."""
        if self.finished:
            raise LocalProtocolError("fold after the contribution ended")
        if self.max_update_norm is not None:
            self.aggregate.measure_base(chunk)
            self.update_squares += self.aggregate.update_squares(values, self.update)
            self.aggregate.norms.check(self.update_squares, self.max_update_norm, complete=False)
        try:
            self.aggregate.fold(chunk, values, self.weight)
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
        self.aggregate.update_weight += self.weight if self.update else 0.0
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
