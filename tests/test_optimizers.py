"""Server optimizers: the block-wise steps against whole-array formulas written out plainly,
the settings they refuse, and no allocation that grows with the number of blocks."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hauler.aggregate.optimizers import (
    OPTIMIZER_NAMES,
    OptimizerSettings,
    ServerOptimizer,
    make_optimizer,
)
from hauler.core.errors import ConfigError, LocalProtocolError

ROUNDS = 3
DTYPES = [np.float32, np.float64]
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}
SETTING_VALUES = {
    "lr": st.floats(0.01, 2.0),
    "momentum": st.floats(0.0, 0.99),
    "beta1": st.floats(0.0, 0.99),
    # beta2 >= 0.5 keeps fedyogi's v from cancelling to nearly 0 in float32 (v - d^2 >= v/2)
    "beta2": st.floats(0.5, 0.999),
    "tau": st.floats(1e-3, 1.0),
}


def reference(name: str, setting: dict, x: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """The global model after every round, whole arrays in float64, the formulas as written."""
    x = x.astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, setting.get("tau", 0.0) ** 2)
    for d in deltas.astype(np.float64):
        if name == "fedavg":
            x = x + d
        elif name == "fedavgm":
            m = setting["momentum"] * m + d
            x = x + setting["lr"] * m
        elif name == "nesterov":
            m = setting["momentum"] * m + d
            x = x + setting["lr"] * (d + setting["momentum"] * m)
        else:
            m = setting["beta1"] * m + (1 - setting["beta1"]) * d
            if name == "fedadam":
                v = setting["beta2"] * v + (1 - setting["beta2"]) * d**2
            elif name == "fedyogi":
                v = v - (1 - setting["beta2"]) * d**2 * np.sign(v - d**2)
            else:
                v = v + d**2
            x = x + setting["lr"] * m / (np.sqrt(v) + setting["tau"])
    return x


def fresh_state(optimizer: ServerOptimizer, size: int, dtype: type) -> dict[str, np.ndarray]:
    return {
        name: np.full(size, optimizer.initial_state(name), dtype) for name in optimizer.state_names
    }


def blockwise(
    optimizer: ServerOptimizer,
    x: np.ndarray,
    deltas: np.ndarray,
    block_sizes: list[int],
    *,
    aliased: bool = False,
) -> np.ndarray:
    """The global model after every round, round r stepped in blocks of block_sizes[r]; with
    `aliased`, each step is written over its delta."""
    x = x.copy()
    state = fresh_state(optimizer, x.size, x.dtype)
    for delta, size in zip(deltas, block_sizes):
        delta = delta.copy()
        step = delta if aliased else np.empty_like(delta)
        for start in range(0, x.size, size):
            block = slice(start, start + size)
            blocks = {name: array[block] for name, array in state.items()}
            optimizer.step(delta[block], blocks, step[block])
        x += step
    return x


def optimizer_settings(name: str) -> st.SearchStrategy[OptimizerSettings]:
    """Settings for `name`, each either left to its default or drawn from its valid range."""
    keys = [key for key in make_optimizer(OptimizerSettings(name)).describe() if key != "name"]
    drawn = st.fixed_dictionaries({key: st.none() | SETTING_VALUES[key] for key in keys})
    return drawn.map(lambda values: OptimizerSettings(name, **values))


@st.composite
def rounds(draw: st.DrawFn) -> tuple[int, list[int], int]:
    """A model size, one block size per round (1 element up to the whole model), a seed."""
    size = draw(st.integers(1, 200))
    block_sizes = draw(st.lists(st.integers(1, size), min_size=ROUNDS, max_size=ROUNDS))
    return size, block_sizes, draw(st.integers(0, 2**32 - 1))


def random_round_data(size: int, seed: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(size).astype(dtype)
    return x, rng.standard_normal((ROUNDS, size)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@settings(max_examples=30)
@given(data=st.data())
def test_blockwise_steps_match_the_whole_array_formulas(name, dtype, data):
    optimizer = make_optimizer(data.draw(optimizer_settings(name)))
    size, block_sizes, seed = data.draw(rounds())
    x, deltas = random_round_data(size, seed, dtype)
    actual = blockwise(optimizer, x, deltas, block_sizes)
    expected = reference(name, optimizer.describe(), x, deltas)
    tolerance = TOLERANCE[dtype]
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_a_step_written_over_its_delta_is_the_same_step(name, dtype):
    x, deltas = random_round_data(1000, seed=7, dtype=dtype)
    block_sizes = [1000, 333, 1]
    separate = blockwise(make_optimizer(OptimizerSettings(name)), x, deltas, block_sizes)
    aliased = blockwise(
        make_optimizer(OptimizerSettings(name)), x, deltas, block_sizes, aliased=True
    )
    np.testing.assert_array_equal(aliased, separate)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fedavg", {}),
        ("fedavgm", {"lr": 1.0, "momentum": 0.9}),
        ("nesterov", {"lr": 0.7, "momentum": 0.9}),
        ("fedadam", {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
        ("fedyogi", {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
        ("fedadagrad", {"lr": 0.1, "beta1": 0.9, "tau": 1e-3}),
    ],
)
def test_describe_reports_the_defaults(name, expected):
    assert make_optimizer(OptimizerSettings(name)).describe() == {"name": name, **expected}


def test_describe_reports_the_settings_given_over_the_defaults():
    optimizer = make_optimizer(OptimizerSettings("fedyogi", lr=0.01, tau=1e-2))
    assert optimizer.describe() == {
        "name": "fedyogi",
        "lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-2,
    }


def test_state_starts_at_zero_and_v_at_tau_squared():
    optimizer = make_optimizer(OptimizerSettings("fedadam", tau=0.5))
    assert optimizer.state_names == ("m", "v")
    assert (optimizer.initial_state("m"), optimizer.initial_state("v")) == (0.0, 0.25)
    assert make_optimizer(OptimizerSettings("fedavgm")).state_names == ("momentum",)
    assert make_optimizer(OptimizerSettings("fedavg")).state_names == ()
    with pytest.raises(LocalProtocolError, match="momentum"):
        optimizer.initial_state("momentum")


def test_an_unknown_optimizer_is_refused_listing_the_valid_ones():
    with pytest.raises(ConfigError, match="'fedsgd'") as refused:
        make_optimizer(OptimizerSettings("fedsgd"))
    assert all(name in str(refused.value) for name in OPTIMIZER_NAMES)


@pytest.mark.parametrize(
    ("name", "setting", "used"),
    [
        ("fedavg", "lr", []),
        ("fedavgm", "beta1", ["lr", "momentum"]),
        ("nesterov", "tau", ["lr", "momentum"]),
        ("fedadam", "momentum", ["lr", "beta1", "beta2", "tau"]),
        ("fedadagrad", "beta2", ["lr", "beta1", "tau"]),
    ],
)
def test_a_setting_the_optimizer_does_not_use_is_refused(name, setting, used):
    with pytest.raises(ConfigError, match=f"does not use {setting}") as refused:
        make_optimizer(OptimizerSettings(name, **{setting: 0.5}))
    assert all(key in str(refused.value) for key in used)


@pytest.mark.parametrize(
    ("name", "setting", "value"),
    [
        ("fedavgm", "lr", 0.0),
        ("nesterov", "lr", -0.1),
        ("fedadam", "lr", math.inf),
        ("fedadam", "lr", math.nan),
        ("fedavgm", "momentum", 1.0),
        ("nesterov", "momentum", -0.1),
        ("fedadam", "beta1", 1.0),
        ("fedyogi", "beta2", 1.5),
        ("fedyogi", "beta2", math.nan),
        ("fedadagrad", "tau", 0.0),
        ("fedadagrad", "tau", -1e-3),
    ],
)
def test_a_value_out_of_range_is_refused(name, setting, value):
    with pytest.raises(ConfigError, match=f"{setting} = "):
        make_optimizer(OptimizerSettings(name, **{setting: value}))


@pytest.mark.parametrize(
    ("delta", "state", "out"),
    [
        (np.zeros(4, np.float32), {"m": np.zeros(3, np.float32)}, np.zeros(4, np.float32)),
        (np.zeros(4, np.float32), {"m": np.zeros(4, np.float64)}, np.zeros(4, np.float32)),
        (np.zeros(4, np.float32), {}, np.zeros(4, np.float32)),
        (np.zeros(4, np.float32), {"m": np.zeros(4, np.float32)}, np.zeros(1, np.float32)),
        (np.zeros(4, np.float16), {"m": np.zeros(4, np.float16)}, np.zeros(4, np.float16)),
    ],
)
def test_blocks_that_would_broadcast_or_cast_are_refused(delta, state, out):
    optimizer = make_optimizer(OptimizerSettings("fedadagrad"))
    state.setdefault("v", np.zeros_like(delta))
    with pytest.raises(LocalProtocolError):
        optimizer.step(delta, state, out)


BLOCK = 100_000
BLOCKS_STEPPED = 200
ALLOCATION_BOUND_BYTES = 64 * 1024  # one temporary block would be 400 KB or more


def peak_traced_bytes(work) -> int:
    """The most memory Python and numpy held at once while `work` ran, above what it started
    with (numpy reports its data buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_temporary_block_shows_in_the_peak():
    block = np.ones(BLOCK, np.float32)
    assert peak_traced_bytes(lambda: block * 2.0) > ALLOCATION_BOUND_BYTES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_stepping_many_blocks_allocates_nothing_after_the_first(name, dtype):
    optimizer = make_optimizer(OptimizerSettings(name))
    blocks = [slice(start, start + BLOCK) for start in range(0, 10 * BLOCK, BLOCK)]
    delta = np.random.default_rng(0).standard_normal(10 * BLOCK).astype(dtype)
    state = fresh_state(optimizer, delta.size, dtype)
    out = np.empty_like(delta)

    def step(block: slice) -> None:
        optimizer.step(delta[block], {k: s[block] for k, s in state.items()}, out[block])

    step(blocks[0])  # grows the scratch buffers to a block

    def many_blocks() -> None:
        for index in range(BLOCKS_STEPPED):
            step(blocks[index % len(blocks)])

    assert peak_traced_bytes(many_blocks) < ALLOCATION_BOUND_BYTES
