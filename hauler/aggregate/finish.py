"""The end of a round, chunk by chunk: sums -> average -> server optimizer -> download codec ->
the next global model.

For each chunk of the model, each float piece's averaged update (the pseudo-gradient `delta`,
sum / W - base x full_weight / W) becomes the optimizer's step (aggregate/optimizers.py, its
state carried in aggregate/state.py); each other piece takes its policy's value
(aggregate/integers.py). With a download codec the chunk is then encoded once, written to the
round's delta file that every site holding the previous round downloads, and decoded again
here: the new model is base + decode(encode(step + residual)), exactly what each site computes
from the same bytes, so every participant holds the same bits (DESIGN.md, invariant 8); what
the codec dropped stays in the server's residual for the next round.

Plain FedAvg without a download codec keeps its exact form, (sum + base x update_weight) / W,
block by block in the accumulator. Memory: two reused chunk-sized buffers and the encoder's
own; the model, sums and state are memory-mapped files.
"""

from __future__ import annotations

import numpy as np

from hauler.aggregate import integers
from hauler.aggregate.fedavg import BLOCK_ELEMENTS, FedAvg
from hauler.aggregate.optimizers import ServerOptimizer
from hauler.aggregate.state import RESIDUAL, RoundState
from hauler.core.errors import JobError, LocalProtocolError
from hauler.model import Chunk, Run, Span
from hauler.model.codecs import Codec
from hauler.model.encoded import EncodedWriter
from hauler.model.plan import PieceArrays
from hauler.model.updates import apply_delta


class DownloadEncoder:
    """Encodes each chunk of the round's global delta into the delta file, and decodes it back
    into what every site will add."""

    def __init__(self, codec: Codec, writer: EncodedWriter, max_encoded_bytes: int) -> None:
        self.codec, self.writer = codec, writer
        self._encoded = memoryview(bytearray(max_encoded_bytes))

    def encode(self, values: PieceArrays, decoded: PieceArrays) -> None:
        """Encode `values` (float pieces: the delta; others: new values), write the encoding,
        and decode it into `decoded`."""
        size = self.codec.encode([array for _, array in values], self._encoded)
        self.writer.write(self._encoded[:size])
        self.codec.decode(self._encoded[:size], [array for _, array in decoded])


class RoundFinish:
    """Turns the round's sums in `fedavg` into its output model, chunk by chunk."""

    def __init__(
        self,
        fedavg: FedAvg,
        optimizer: ServerOptimizer,
        state: RoundState | None = None,
        encoder: DownloadEncoder | None = None,
    ) -> None:
        if fedavg.output is None or not fedavg.contributions or fedavg.tainted:
            raise LocalProtocolError(
                "finish needs a clean aggregate with at least one contribution"
            )
        self.fedavg, self.optimizer, self.state, self.encoder = fedavg, optimizer, state, encoder
        self.plan = fedavg.plan
        self.exact = optimizer.name == "fedavg" and encoder is None
        self._values = memoryview(bytearray(self.plan.max_wide_bytes))
        self._decoded = memoryview(bytearray(self.plan.max_wide_bytes if encoder else 0))
        self._scratch = memoryview(bytearray(0 if self.exact else self.plan.max_wide_bytes))

    @np.errstate(over="ignore", invalid="ignore")  # an overflow is refused by _check_finite
    def run(self) -> None:
        """Write every chunk of the output model."""
        for chunk in self.plan.manifest.chunks():
            if self.exact:
                for span in self._spans(chunk):
                    self._average_exactly(span)
            else:
                self._chunk(chunk)

    def _spans(self, chunk: Chunk) -> list[Span]:
        """The chunk's runs of float tensors summed in the output file, as runs; the rest
        piece by piece (their sums are kept per tensor)."""
        fedavg, spans = self.fedavg, []
        for run in self.plan.runs(chunk):
            in_place = fedavg.floating[run.tensor] and fedavg.in_place[run.tensor]
            spans.extend([run] if in_place else run.pieces)
        return spans

    def _average_exactly(self, span: Span) -> None:
        """Plain FedAvg: (sum + base x update_weight) / W, in the accumulator, block by block."""
        fedavg = self.fedavg
        accumulated, out = fedavg.accumulated(span), self._output(span)
        if not fedavg.floating[span.tensor]:
            base = fedavg.based(span) if fedavg.base is not None else out
            policy = fedavg.policies[span.tensor]
            integers.finish(policy, accumulated, base, fedavg.total_weight, out)
            return
        for start in range(0, accumulated.size, BLOCK_ELEMENTS):
            block = accumulated[start : start + BLOCK_ELEMENTS]
            if fedavg.update_weight:
                scratch = fedavg.scratch(block.dtype, block.size)
                base = fedavg.based(span)[start : start + BLOCK_ELEMENTS]
                np.multiply(base, fedavg.update_weight, out=scratch, casting="unsafe")
                np.add(block, scratch, out=block)
            np.multiply(block, 1.0 / fedavg.total_weight, out=block)
            target = out[start : start + BLOCK_ELEMENTS]
            if not fedavg.in_place[span.tensor]:
                np.copyto(target, block, casting="unsafe")
            self._check_finite(span, target)

    def _chunk(self, chunk: Chunk) -> None:
        """The optimizer's step (and the codec's round trip) for one chunk, into the output."""
        values = self.plan.wide_arrays(chunk, self._values)
        for run, array in values:
            for span, part in self._split(run, array):
                if self.fedavg.floating[span.tensor]:
                    self._step(span, part)
                else:
                    self._policy(span, part)
        decoded = values
        if self.encoder is not None:
            decoded = self.plan.wide_arrays(chunk, self._decoded)
            self.encoder.encode(values, decoded)
        for (run, sent), (_, added) in zip(values, decoded):
            self._apply(run, sent, added)

    def _split(self, run: Run, array: np.ndarray) -> list[tuple[Span, np.ndarray]]:
        """A run whole where its sums are in the output file, else its pieces."""
        fedavg = self.fedavg
        if fedavg.floating[run.tensor] and fedavg.in_place[run.tensor]:
            return [(run, array)]
        return list(run.split(array))

    def _step(self, span: Span, out: np.ndarray) -> None:
        """The averaged update, then the optimizer's step, then the residual the codec still
        owes (the step it will encode)."""
        fedavg = self.fedavg
        np.multiply(fedavg.accumulated(span), 1.0 / fedavg.total_weight, out=out)
        if fedavg.full_weight:
            base = self._base_in(span, out.dtype)
            np.multiply(base, fedavg.full_weight / fedavg.total_weight, out=base)
            np.subtract(out, base, out=out)
        views = self.state.carried(span) if self.state is not None else {}
        self.optimizer.step(out, {k: views[k] for k in self.optimizer.state_names}, out)
        if RESIDUAL in views:
            np.add(out, views[RESIDUAL], out=out)

    def _policy(self, span: Span, out: np.ndarray) -> None:
        fedavg = self.fedavg
        base = fedavg.based(span)
        policy = fedavg.policies[span.tensor]
        integers.finish(policy, fedavg.accumulated(span), base, fedavg.total_weight, out)

    def _apply(self, run: Run, sent: np.ndarray, added: np.ndarray) -> None:
        """Write base + the decoded delta (or the new values) into the output, the one way every
        site does; the server's residual keeps what the output misses of base + what was meant
        to be sent."""
        out = self._output(run)
        floating = self.fedavg.floating[run.tensor]
        apply_delta(out, added, self._scratch, start=self.fedavg.based(run) if floating else None)
        if not floating:
            return
        self._check_finite(run, out)
        views = self.state.views(run) if self.state is not None else {}
        if RESIDUAL in views:  # residual = (base + sent) - output, in the accumulator dtype
            residual = views[RESIDUAL]
            self._base_in(run, residual.dtype, into=residual)
            np.add(residual, sent, out=residual)
            np.subtract(residual, out, out=residual, casting="unsafe")

    def _base_in(self, span: Span, dtype: np.dtype, into: np.ndarray | None = None) -> np.ndarray:
        """The base model's values of `span` as `dtype`, in a scratch block (or `into`)."""
        base = self.fedavg.based(span)
        target = into if into is not None else np.frombuffer(self._scratch, dtype, base.size)
        np.copyto(target, base, casting="unsafe")
        return target

    def _output(self, span: Span) -> np.ndarray:
        """The output file's values of a piece or run (in the tensors' own dtype)."""
        output = self.fedavg.output
        assert output is not None
        view = output.region(self.plan.data_offset(span), span.length)
        return np.frombuffer(view, self.plan.dtype(span))

    def _check_finite(self, span: Span, values: np.ndarray) -> None:
        """Every fold was finite, yet the result may not be once cast back (float16), rebased,
        or stepped."""
        if not self.fedavg.finite.all_finite(values):
            element = int(np.flatnonzero(~np.isfinite(values))[0])
            piece = span.piece_at(element) if isinstance(span, Run) else span
            name = self.plan.manifest.tensors[piece.tensor].name
            raise JobError(
                f"the new value of tensor {name!r} overflows its dtype; set [workflow] "
                "max_update_norm to bound what sites may send"
            )
