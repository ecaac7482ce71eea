"""Server optimizers: the step a round adds to the global model, computed block by block.

Each round the server averages the sites' updates; `delta` is that average minus the round's
global model, a pseudo-gradient pointing the way the sites moved (a direction to ADD: the
outer gradient of DiLoCo is -delta). An optimizer turns it into the step of `x_new = x + step`.

Block by block: the model may be far larger than memory, so the caller walks it in blocks (up
to about 1M elements, any size, the last one often short) and calls `step` once per block.
The optimizer's state (momentum, second moment) lives in the caller's memory-mapped files, one
element per model element, and arrives as views of the matching blocks, updated here in place.
Nothing model-sized is allocated here: each instance keeps a few scratch buffers as large as
the largest block seen, and every operation is a numpy ufunc writing with `out=`.

The rules, elementwise on one block (d = delta, float32 or float64 like the state):

    fedavg      step = d
    fedavgm     m = momentum*m + d;                  step = lr*m           (Hsu et al. 2019)
    nesterov    m = momentum*m + d;                  step = lr*(d + momentum*m)   (DiLoCo)
    fedadam     m = beta1*m + (1-beta1)*d
                v = beta2*v + (1-beta2)*d^2;         step = lr*m/(sqrt(v) + tau)
    fedyogi     m as fedadam
                v = v - (1-beta2)*d^2*sign(v - d^2); step as fedadam
    fedadagrad  m as fedadam;  v = v + d^2;          step as fedadam

`nesterov` is SGD with Nesterov momentum on the outer gradient -d, as in PyTorch's SGD and
DiLoCo's outer optimizer. The adaptive rules follow Reddi et al., "Adaptive Federated
Optimization" (2021), Algorithm 2: no bias correction, v starting at tau^2 (their
v_{-1} >= tau^2; m starts at 0), and momentum beta1 for FedAdagrad too (beta1 = 0 gives plain
Adagrad, step = lr*d/(sqrt(v) + tau)).

Defaults: fedavgm lr 1.0, momentum 0.9; nesterov lr 0.7, momentum 0.9 (DiLoCo's); adaptive
lr 0.1, beta1 0.9, beta2 0.99, tau 1e-3, inside the ranges Reddi et al. searched. They are
starting points to tune for each model, not tuned values. Flower's differ: its FedAdagrad has
no momentum, its FedAdam applies Adam's bias correction, its v starts at 0, and its older
strategies used tau = 1e-9.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from hauler.core.errors import ConfigError, LocalProtocolError
from hauler.model.codecs import Scratch

_POSITIVE = ("lr", "tau")  # finite and > 0; every other setting is a decay in [0, 1)


@dataclass(frozen=True)
class OptimizerSettings:
    """The server optimizer a job asks for; a None setting takes the optimizer's default."""

    name: str = "fedavg"
    lr: float | None = None
    momentum: float | None = None  # fedavgm, nesterov
    beta1: float | None = None  # fedadam, fedyogi, fedadagrad
    beta2: float | None = None  # fedadam, fedyogi
    tau: float | None = None  # fedadam, fedyogi, fedadagrad


class ServerOptimizer(abc.ABC):
    """Turns a round's `delta` into the step to add to the global model, one block at a time.

    Not for concurrent use: its calls share its scratch buffers (one instance per thread).
    """

    name: ClassVar[str]
    state_names: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, float]] = {}  # its settings, in the order describe() lists

    def __init__(self, **settings: float) -> None:
        self._settings = settings
        self._scratch = Scratch()

    def initial_state(self, state_name: str) -> float:
        """The value every element of state `state_name` starts at before the first round."""
        if state_name not in self.state_names:
            raise LocalProtocolError(f"{self.name} has no state {state_name!r}")
        return 0.0

    def step(self, delta: np.ndarray, state: dict[str, np.ndarray], out: np.ndarray) -> None:
        """Write into `out` the step for this block of `delta`, updating `state`'s blocks in
        place. All arrays have one shape and one dtype (float32 or float64); `out` may be
        `delta` itself."""
        _check_block(self, delta, state, out)
        self._step(delta, state, out)

    def describe(self) -> dict[str, float | str]:
        """Its name and every effective setting, for the job's events."""
        return {"name": self.name, **self._settings}

    @abc.abstractmethod
    def _step(self, delta: np.ndarray, state: dict[str, np.ndarray], out: np.ndarray) -> None:
        """`step` on a block already checked."""


class PlainAverage(ServerOptimizer):
    """FedAvg: the averaged model becomes the global model, step = delta."""

    name = "fedavg"

    def _step(self, delta: np.ndarray, state: dict[str, np.ndarray], out: np.ndarray) -> None:
        np.copyto(out, delta)


class ServerMomentum(ServerOptimizer):
    """FedAvgM (Hsu et al. 2019): heavy-ball momentum on delta."""

    name = "fedavgm"
    state_names = ("momentum",)
    defaults = {"lr": 1.0, "momentum": 0.9}

    def __init__(self, *, lr: float, momentum: float) -> None:
        super().__init__(lr=lr, momentum=momentum)
        self.lr, self.momentum = lr, momentum

    def _step(self, delta: np.ndarray, state: dict[str, np.ndarray], out: np.ndarray) -> None:
        m = _momentum(state["momentum"], self.momentum, delta)
        np.multiply(m, self.lr, out=out)


def _momentum(m: np.ndarray, momentum: float, delta: np.ndarray) -> np.ndarray:
    """m <- momentum x m + delta, in place; returns m."""
    m *= momentum
    m += delta
    return m


class NesterovMomentum(ServerOptimizer):
    """DiLoCo's outer optimizer: SGD with Nesterov momentum on the outer gradient -delta."""

    name = "nesterov"
    state_names = ("momentum",)
    defaults = {"lr": 0.7, "momentum": 0.9}

    def __init__(self, *, lr: float, momentum: float) -> None:
        super().__init__(lr=lr, momentum=momentum)
        self.lr, self.momentum = lr, momentum

    def _step(self, delta: np.ndarray, state: dict[str, np.ndarray], out: np.ndarray) -> None:
        m = _momentum(state["momentum"], self.momentum, delta)
        look_ahead = _like(self._scratch, 0, m)
        np.multiply(m, self.momentum, out=look_ahead)
        np.add(look_ahead, delta, out=out)  # delta is read for the last time here
        out *= self.lr


class _Adaptive(ServerOptimizer):
    """Reddi et al.'s adaptive server optimizers; they differ only in how v follows delta^2."""

    state_names = ("m", "v")
    defaults = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}

    def __init__(self, **settings: float) -> None:
        super().__init__(**settings)
        self.lr, self.beta1, self.tau = settings["lr"], settings["beta1"], settings["tau"]

    def initial_state(self, state_name: str) -> float:
        """0 for m; tau^2 for v, Reddi et al.'s v_{-1} >= tau^2."""
        initial = super().initial_state(state_name)
        return self.tau**2 if state_name == "v" else initial

    def _step(self, delta: np.ndarray, state: dict[str, np.ndarray], out: np.ndarray) -> None:
        m, v = state["m"], state["v"]
        work = _like(self._scratch, 0, delta)  # delta^2, then (1-beta1)*delta, then sqrt(v)+tau
        np.square(delta, out=work)
        self._update_v(v, work)
        np.multiply(delta, 1.0 - self.beta1, out=work)  # delta is read for the last time here
        m *= self.beta1
        m += work
        np.sqrt(v, out=work)
        work += self.tau
        np.divide(m, work, out=out)
        out *= self.lr

    @abc.abstractmethod
    def _update_v(self, v: np.ndarray, squares: np.ndarray) -> None:
        """Update v in place from delta^2 (`squares`, read only: the step reuses its buffer)."""


class FedAdam(_Adaptive):
    """v is an exponential moving average of delta^2."""

    name = "fedadam"

    def __init__(self, *, lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, tau=tau)
        self.beta2 = beta2

    def _update_v(self, v: np.ndarray, squares: np.ndarray) -> None:
        weighted = _like(self._scratch, 1, v)
        np.multiply(squares, 1.0 - self.beta2, out=weighted)
        v *= self.beta2
        v += weighted


class FedYogi(_Adaptive):
    """v moves towards delta^2 by a fixed fraction of delta^2, whichever side it is on."""

    name = "fedyogi"

    def __init__(self, *, lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, tau=tau)
        self.beta2 = beta2

    def _update_v(self, v: np.ndarray, squares: np.ndarray) -> None:
        change = _like(self._scratch, 1, v)
        np.subtract(v, squares, out=change)
        np.sign(change, out=change)
        change *= squares
        change *= 1.0 - self.beta2
        v -= change


class FedAdagrad(_Adaptive):
    """v sums every round's delta^2, so steps shrink where delta has been large."""

    name = "fedadagrad"
    defaults = {"lr": 0.1, "beta1": 0.9, "tau": 1e-3}

    def __init__(self, *, lr: float, beta1: float, tau: float) -> None:
        super().__init__(lr=lr, beta1=beta1, tau=tau)

    def _update_v(self, v: np.ndarray, squares: np.ndarray) -> None:
        v += squares


_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls
    for cls in (PlainAverage, ServerMomentum, NesterovMomentum, FedAdam, FedYogi, FedAdagrad)
}


OPTIMIZER_NAMES = tuple(_OPTIMIZERS)  # job.toml's OptimizerName lists these (a test keeps them so)


def _like(scratch: Scratch, slot: int, like: np.ndarray) -> np.ndarray:
    """Work buffer `slot`, of `like`'s shape and dtype, reused across blocks; its contents are
    garbage."""
    return scratch.array(str(slot), like.dtype, like.size).reshape(like.shape)


def make_optimizer(settings: OptimizerSettings) -> ServerOptimizer:
    """The optimizer `settings` names, its unset settings at their defaults.

    Raises ConfigError for an unknown name, for a setting the optimizer does not use, and for
    a value out of range (lr, tau finite and > 0; momentum, beta1, beta2 in [0, 1)).
    """
    cls = _OPTIMIZERS.get(settings.name)
    if cls is None:
        raise ConfigError(
            f"unknown server optimizer {settings.name!r}; choose one of "
            f"{', '.join(OPTIMIZER_NAMES)}"
        )
    given = {
        field.name: getattr(settings, field.name)
        for field in fields(settings)
        if field.name != "name" and getattr(settings, field.name) is not None
    }
    _check_used(cls, given)
    effective = {**cls.defaults, **given}
    for key, value in effective.items():
        _check_range(cls.name, key, value)
    return cls(**effective)


def _check_used(cls: type[ServerOptimizer], given: dict[str, float]) -> None:
    unused = [key for key in given if key not in cls.defaults]
    if not unused:
        return
    uses = f"its settings are {', '.join(cls.defaults)}" if cls.defaults else "it takes none"
    raise ConfigError(
        f"server optimizer {cls.name!r} does not use {', '.join(unused)}; {uses}. "
        "Remove the setting or choose another optimizer"
    )


def _check_range(name: str, key: str, value: float) -> None:
    if key in _POSITIVE:
        valid, rule = math.isfinite(value) and value > 0, "a finite number > 0"
    else:
        valid, rule = 0 <= value < 1, "at least 0 and below 1"
    if not valid:
        raise ConfigError(f"server optimizer {name!r}: {key} = {value!r}; it must be {rule}")


def _check_block(
    optimizer: ServerOptimizer, delta: np.ndarray, state: dict[str, np.ndarray], out: np.ndarray
) -> None:
    """Refuse blocks that would broadcast or cast silently: a caller's bug, not a user's."""
    if delta.dtype not in (np.float32, np.float64):
        raise LocalProtocolError(f"{optimizer.name}: delta is {delta.dtype}, not float32/64")
    if len(state) != len(optimizer.state_names) or any(
        name not in state for name in optimizer.state_names
    ):
        raise LocalProtocolError(
            f"{optimizer.name} needs state {optimizer.state_names}, got {tuple(state)}"
        )
    for what, block in (("out", out), *state.items()):
        if block.shape != delta.shape or block.dtype != delta.dtype:
            raise LocalProtocolError(
                f"{optimizer.name}: {what} is {block.dtype}{block.shape}, "
                f"delta {delta.dtype}{delta.shape}"
            )
