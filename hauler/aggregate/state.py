"""What the server carries from round to round besides the model: the optimizer's moments and
the residual of the download codec, in one memory-mapped safetensors file per round.

Round r+1's state is written into a file of its own while round r's is only read, so a
server that stops mid-finish restarts from round r with round r's state intact; the state file
is part of its round (committed with it, checked with it at restart). It holds, for every
float tensor and kind, a flat tensor `kind/name` of the accumulator dtype; a round that has no
file yet (round 0) starts from the optimizer's initial values and a zero residual.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hauler.model import Manifest, ModelFile, Span
from hauler.model.updates import RESIDUAL, kind_block, wide_manifest

__all__ = ["RESIDUAL", "RoundState", "wide_manifest"]


class RoundState:
    """The state of the round being finished: `views` of a piece's state in the new file,
    first filled from the previous round's file or with the initial values."""

    def __init__(
        self,
        manifest: Manifest,
        current: ModelFile,
        previous: ModelFile | None,
        initial: Mapping[str, float],
    ) -> None:
        self.manifest, self.current, self.previous, self.initial = (
            manifest,
            current,
            previous,
            initial,
        )

    def carried(self, span: Span) -> dict[str, np.ndarray]:
        """Each kind's block for a piece or run in the new file, carried over from the previous
        round (call once per span, before updating it)."""
        views = self.views(span)
        for kind, view in views.items():
            if self.previous is None:
                view[...] = self.initial[kind]
            else:
                np.copyto(view, kind_block(self.previous, kind, self.manifest, span))
        return views

    def views(self, span: Span) -> dict[str, np.ndarray]:
        """Each kind's block for a piece or run in the new file, as it is."""
        return {kind: kind_block(self.current, kind, self.manifest, span) for kind in self.initial}
