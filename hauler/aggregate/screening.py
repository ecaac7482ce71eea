"""Checks on what a site contributes, made while its chunks are folded: nothing non-finite
reaches a sum, and an update may not be larger than `max_update_norm` times the global model.

Both checks run on blocks already in cache during the fold, so they cost one more pass over a
chunk (about 80 us per 4 MiB block for the finite check). They raise `UpdateRefused`, which
fails the upload for good: the caller abandons the contribution, which taints the round, and
the round is refolded without that site (docs/design.md, "Aggregation and exact discard").
"""

from __future__ import annotations

import math

import numpy as np

from hauler.core.errors import UpdateRefused
from hauler.model import Chunk, Manifest


class FiniteCheck:
    """Whether a block holds only finite values, with one reused buffer of flags."""

    def __init__(self, block_elements: int) -> None:
        self._flags = np.empty(block_elements, np.bool_)

    def all_finite(self, block: np.ndarray) -> bool:
        flags = self._flags[: block.size]
        np.isfinite(block, out=flags)
        return bool(flags.all())

    def check_folded(
        self, block: np.ndarray, manifest: Manifest, chunk: Chunk, tensor: int
    ) -> None:
        """Refuse a block of tensor `tensor` holding NaN or infinity (sent by the site, or an
        overflow once folded)."""
        if not self.all_finite(block):
            raise non_finite(manifest.tensors[tensor].name, chunk)


def non_finite(name: str, chunk: Chunk) -> UpdateRefused:
    """The refusal of an update holding NaN or infinity in tensor `name`."""
    return UpdateRefused(
        f"non-finite values in tensor {name!r} (chunk {chunk.seq}); the update is dropped from "
        "the round"
    )


class UpdateNorms:
    """The norm of each update and of the round's global model, summed chunk by chunk.

    The global model's squares are measured once per chunk and round, on the first fold of
    that chunk; an update's are summed per contribution. Only floating-point tensors count.
    """

    def __init__(self, chunks: int) -> None:
        self._base_squares = np.zeros(chunks, np.float64)
        self._measured = bytearray(chunks)
        self._missing = chunks

    def restart(self) -> None:
        """A new round: its global model is another one."""
        self._base_squares[:] = 0.0
        self._measured[:] = bytes(len(self._measured))
        self._missing = len(self._measured)

    def add_base(self, seq: int, squares: float) -> None:
        if not self._measured[seq]:
            self._measured[seq], self._base_squares[seq] = 1, squares
            self._missing -= 1

    def measured(self, seq: int) -> bool:
        return bool(self._measured[seq])

    @property
    def base_norm(self) -> float | None:
        """The global model's norm once every chunk has been measured."""
        return None if self._missing else math.sqrt(float(self._base_squares.sum()))

    def check(self, update_squares: float, limit: float, *, complete: bool) -> None:
        """Refuse an update whose norm (so far, or `complete`) exceeds `limit` x the global
        model's."""
        base = self.base_norm
        if base is None:
            return
        norm = math.sqrt(update_squares)
        ratio = norm / base if base > 0 else norm  # an all-zero global model: the norm itself
        if ratio > limit or (complete and not math.isfinite(ratio)):
            measured = f"{ratio:.3g}" if complete else f"at least {ratio:.3g}"
            raise UpdateRefused(
                f"update norm {measured} x the global model's is above "
                f"max_update_norm = {limit:g}; the update is dropped from the round"
            )


def check_weight(weight: float, site: str, limit: float) -> None:
    """A site's weight must be finite, positive and at most `limit`, or it outweighs the rest."""
    if not (math.isfinite(weight) and 0 < weight <= limit):
        raise UpdateRefused(
            f"{site} announced weight {weight!r}; a weight must be finite, "
            f"positive and at most max_weight = {limit:g} ([workflow] in job.toml)"
        )


def squares(block: np.ndarray) -> float:
    """Sum of squares of a float block (BLAS dot; infinity when it overflows)."""
    return float(np.dot(block, block))
