"""FedAvg as a fold: exact weighted averages over every dtype and awkward layouts, chunk by
chunk in any interleaving, and a contribution that stops part-way leaves no trace."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers import (
    MIXED_LAYOUT,
    create_model,
    expected_average,
    fill_exact_values,
    manifest_of,
)
from hypothesis import given
from hypothesis import strategies as st

from hauler.aggregate import FedAvg, OptimizerSettings, make_optimizer
from hauler.aggregate.fedavg import BLOCK_ELEMENTS
from hauler.aggregate.finish import RoundFinish
from hauler.core.errors import JobError, LocalProtocolError, UpdateRefused
from hauler.model import ChunkPlan, ModelFile

BUDGETS = {"in_memory": 1 << 30, "file_backed": 0}
LARGE_LAYOUT = [
    *MIXED_LAYOUT,
    ("crosses_blocks", "F32", (BLOCK_ELEMENTS + 5,)),
    ("half_crosses_blocks", "F16", (BLOCK_ELEMENTS + 3,)),
]


def sites(folder: Path, layout, count: int, seed: int = 0) -> list[ModelFile]:
    return [
        create_model(
            folder / f"site-{k}.safetensors", layout, fill=fill_exact_values, seed=seed + k
        )
        for k in range(count)
    ]


def aggregate(folder: Path, layout, budget: int = 1 << 30) -> tuple[FedAvg, ModelFile]:
    manifest = manifest_of(layout)
    fedavg = FedAvg(manifest, workdir=folder, memory_budget_bytes=budget)
    output = ModelFile.create(folder / "round-1.safetensors", manifest)
    fedavg.begin(output)
    return fedavg, output


def values(model: ModelFile, chunk):
    """A chunk of `model` as the fold takes it: an array per tensor piece."""
    return ChunkPlan(model.manifest).arrays(chunk, model.chunk_view(chunk))


def finish(fedavg: FedAvg):
    """The round's end as plain FedAvg makes it: the average into the output, hashed."""
    RoundFinish(fedavg, make_optimizer(OptimizerSettings())).run()
    return fedavg.output.compute_digests()


def assert_result(output: ModelFile, expected: dict[str, np.ndarray]) -> None:
    arrays = output.arrays()
    for name, array in expected.items():
        assert arrays[name].dtype == array.dtype and arrays[name].shape == array.shape, name
        assert np.array_equal(arrays[name], array), f"{name}: {arrays[name]} != {array}"


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("weights", [[1.0], [1.0, 3.0], [2.0, 2.0, 4.0], [0.5, 0.25, 0.25]])
def test_weighted_average_is_exact_for_every_dtype(tmp_path, budget, weights):
    models = sites(tmp_path, LARGE_LAYOUT, len(weights))
    fedavg, output = aggregate(tmp_path, LARGE_LAYOUT, budget)
    for model, weight in zip(models, weights):
        fedavg.fold_model(model, weight)
    manifest = finish(fedavg)
    assert_result(output, expected_average(models, weights))
    assert manifest == output.manifest and all(t.digest for t in manifest.tensors if t.length)
    assert (fedavg.contributions, fedavg.total_weight) == (len(weights), sum(weights))
    assert fedavg.file_backed == (budget == 0)
    assert (tmp_path / "accumulator.bin").exists() == (budget == 0)


def test_integers_are_rounded_half_to_even(tmp_path):
    layout = [("steps", "I64", (4,)), ("count", "U8", (2,)), ("flag", "BOOL", (2,))]
    models = [
        ModelFile.create(tmp_path / f"{k}.safetensors", manifest_of(layout)) for k in range(2)
    ]
    values = [([1, 2, 3, -3], [0, 255], [False, True]), ([2, 2, 4, -4], [1, 255], [True, True])]
    for model, (steps, count, flag) in zip(models, values):
        model.arrays()["steps"][:], model.arrays()["count"][:], model.arrays()["flag"][:] = (
            steps,
            count,
            flag,
        )
    fedavg, output = aggregate(tmp_path, layout)
    for model in models:
        fedavg.fold_model(model, 1.0)
    finish(fedavg)
    assert output.arrays()["steps"].tolist() == [
        2,
        2,
        4,
        -4,
    ]  # 1.5, 2, 3.5, -3.5 rounded half to even
    assert output.arrays()["count"].tolist() == [0, 255]
    assert output.arrays()["flag"].tolist() == [False, True]  # 0.5 rounds to 0 as well


@given(
    values=st.lists(
        st.lists(st.integers(-(10**6), 10**6), min_size=3, max_size=3), min_size=1, max_size=4
    ),
    weights=st.lists(st.integers(1, 1000), min_size=4, max_size=4),
)
def test_integer_average_matches_exact_arithmetic(values, weights):
    weights = weights[: len(values)]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        layout = [("n", "I64", (3,))]
        models = [
            ModelFile.create(folder / f"{k}.safetensors", manifest_of(layout))
            for k in range(len(values))
        ]
        for model, row in zip(models, values):
            model.arrays()["n"][:] = row
        fedavg, output = aggregate(folder, layout)
        for model, weight in zip(models, weights):
            fedavg.fold_model(model, float(weight))
        finish(fedavg)
        expected = expected_average(models, [float(w) for w in weights])["n"]
        assert output.arrays()["n"].tolist() == expected.tolist()
        for model in [*models, output]:
            model.close()


@given(st.data())
def test_chunks_folded_in_any_interleaving_give_the_same_average(data):
    layout = [("w", "F32", (3000,)), ("h", "F16", (2100,)), ("s", "F32", ()), ("n", "I64", (700,))]
    weights = [1.0, 2.0, 1.0]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        models = sites(folder, layout, len(weights), seed=data.draw(st.integers(0, 1000)))
        fedavg, output = aggregate(folder, layout)
        streams = [
            (fedavg.contribution(w), m, list(fedavg.manifest.chunks()))
            for m, w in zip(models, weights)
        ]
        while any(chunks for _, _, chunks in streams):
            contribution, model, chunks = data.draw(st.sampled_from([s for s in streams if s[2]]))
            chunk = chunks.pop(0)
            contribution.fold(chunk, values(model, chunk))
        for contribution, _, _ in streams:
            contribution.complete()
        finish(fedavg)
        assert_result(output, expected_average(models, weights))
        for model in [*models, output]:
            model.close()


@pytest.mark.parametrize("folded_before_failure", [1, 5, 11])
def test_a_contribution_abandoned_part_way_taints_the_round_until_restart(
    tmp_path, folded_before_failure
):
    good = sites(tmp_path, MIXED_LAYOUT, 2)
    garbage = create_model(
        tmp_path / "garbage.safetensors", MIXED_LAYOUT, fill=fill_exact_values, seed=99
    )
    for array in garbage.arrays().values():
        array[...] = 100 if array.dtype.kind in "iuf" else True
    fedavg, output = aggregate(tmp_path, MIXED_LAYOUT)
    fedavg.fold_model(good[0], 2.0)
    failing = fedavg.contribution(1000.0)
    for chunk in list(fedavg.manifest.chunks())[:folded_before_failure]:
        failing.fold(chunk, values(garbage, chunk))
    fedavg.fold_model(good[1], 2.0)  # a site uploading at the same time finishes after the failure
    failing.abandon()
    assert fedavg.tainted
    with pytest.raises(LocalProtocolError):
        finish(fedavg)
    fedavg.restart()  # the federation re-collects the completed sites
    for model in good:
        fedavg.fold_model(model, 2.0)
    finish(fedavg)
    assert_result(output, expected_average(good, [2.0, 2.0]))


def test_a_contribution_abandoned_before_any_chunk_leaves_the_round_clean(tmp_path):
    models = sites(tmp_path, MIXED_LAYOUT, 1)
    fedavg, output = aggregate(tmp_path, MIXED_LAYOUT)
    fedavg.contribution(5.0).abandon()
    fedavg.fold_model(models[0], 3.0)
    assert not fedavg.tainted
    finish(fedavg)
    assert_result(output, expected_average(models, [3.0]))


def test_each_round_starts_from_nothing(tmp_path):
    models = sites(tmp_path, MIXED_LAYOUT, 2)
    manifest = manifest_of(MIXED_LAYOUT)
    fedavg = FedAvg(manifest, workdir=tmp_path, memory_budget_bytes=0)
    for round, model in enumerate(models):
        with ModelFile.create(tmp_path / f"round-{round + 1}.safetensors", manifest) as output:
            fedavg.begin(output)
            fedavg.fold_model(model, 1.0)
            finish(fedavg)
            assert_result(output, expected_average([model], [1.0]))


def test_misuse_is_refused(tmp_path):
    models = sites(tmp_path, MIXED_LAYOUT, 1)
    fedavg, _ = aggregate(tmp_path, MIXED_LAYOUT)
    with pytest.raises(LocalProtocolError):
        finish(fedavg)  # nothing folded yet
    for weight in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            fedavg.contribution(weight)
    partial = fedavg.contribution(1.0)
    chunk = next(fedavg.manifest.chunks())
    partial.fold(chunk, values(models[0], chunk))
    with pytest.raises(LocalProtocolError):
        partial.complete()  # not every chunk arrived
    other_layout = ModelFile.create(
        tmp_path / "other.safetensors", manifest_of([("x", "F32", (3,))])
    )
    with pytest.raises(LocalProtocolError):
        fedavg.begin(other_layout)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("value, weight", [(1000.0, 100.0), (-600.0, 5000.0)])
def test_f16_is_weighted_in_the_accumulator_dtype(tmp_path, value, weight):
    layout = [("x", "F16", (4,))]
    models = [
        ModelFile.create(tmp_path / f"{k}.safetensors", manifest_of(layout)) for k in range(2)
    ]
    for model in models:
        model.arrays()["x"][:] = value
    fedavg, output = aggregate(tmp_path, layout)
    fedavg.fold_model(models[0], weight)
    fedavg.fold_model(models[1], 1.0)
    finish(fedavg)
    assert np.isfinite(output.arrays()["x"].astype(np.float32)).all()
    assert (
        output.arrays()["x"].astype(np.float64).tolist() == [value] * 4
    )  # the average of equal values


FLOAT_LAYOUT = [
    ("weights", "F32", (10_001,)),
    ("double", "F64", (513,)),
    ("brain", "BF16", (2049,)),
]


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
def test_deltas_and_full_models_average_to_what_full_models_give(tmp_path, budget):
    """Site 0 sends its model, site 1 its model minus the base: the result is the plain average."""
    base, full, trained = sites(tmp_path, FLOAT_LAYOUT, 3)
    delta = create_model(tmp_path / "delta.safetensors", FLOAT_LAYOUT)
    for name, array in delta.arrays().items():
        array[...] = trained.arrays()[name] - base.arrays()[name]
    fedavg, output = aggregate(tmp_path, FLOAT_LAYOUT, budget)
    fedavg.begin(output, base=base)
    fedavg.fold_model(full, 1.0)
    contribution = fedavg.contribution(3.0, update=True)
    for chunk in delta.manifest.chunks():
        contribution.fold(chunk, values(delta, chunk))
    contribution.complete()
    finish(fedavg)
    expected = expected_average([full, trained], [1.0, 3.0])
    for (
        name,
        array,
    ) in output.arrays().items():  # base + (trained - base) rounds once: close, not exact
        np.testing.assert_allclose(
            array.astype(np.float64),
            expected[name].astype(np.float64),
            rtol=1e-2,
            atol=1e-2,
            err_msg=name,
        )
    assert not np.array_equal(output.arrays()["weights"], full.arrays()["weights"])


def test_a_delta_needs_the_base_model(tmp_path):
    fedavg, _ = aggregate(tmp_path, FLOAT_LAYOUT)
    with pytest.raises(LocalProtocolError, match="base model"):
        fedavg.contribution(1.0, update=True)


# ----- checked contributions: nothing non-finite is folded, norms within max_update_norm -------


def fold_all(contribution, model: ModelFile) -> None:
    for chunk in model.manifest.chunks():
        contribution.fold(chunk, values(model, chunk))


@pytest.mark.parametrize(
    "poison, weight",
    [(np.nan, 1.0), (np.inf, 1.0), (-np.inf, 1.0), (1.0, 1e9)],
    ids=["nan", "inf", "-inf", "overflow_by_weight"],
)
@pytest.mark.parametrize("tensor", ["weights", "double", "brain"])
def test_a_non_finite_value_is_refused_naming_its_tensor_and_the_round_refolds_exactly(
    tmp_path, poison, weight, tensor
):
    honest = sites(tmp_path, FLOAT_LAYOUT, 2)
    hostile = create_model(
        tmp_path / "hostile.safetensors", FLOAT_LAYOUT, fill=fill_exact_values, seed=7
    )
    target = hostile.arrays()[tensor]
    target[-1] = (
        poison
        if np.isnan(poison) or np.isinf(poison)
        else float(ml_dtypes.finfo(target.dtype).max) / 2
    )
    fedavg, output = aggregate(tmp_path, FLOAT_LAYOUT)
    fedavg.fold_model(honest[0], 1.0)
    contribution = fedavg.contribution(weight)
    with pytest.raises(UpdateRefused, match=f"non-finite values in tensor '{tensor}'"):
        fold_all(contribution, hostile)
    contribution.abandon()
    assert fedavg.tainted  # its earlier chunks were folded: the round is refolded without it
    fedavg.restart()
    for model in honest:
        fedavg.fold_model(model, 1.0)
    finish(fedavg)
    assert_result(output, expected_average(honest, [1.0, 1.0]))


def norm_sites(folder: Path, scale: float) -> tuple[ModelFile, ModelFile, ModelFile]:
    """A base model and two updates of it: one small (0.1 x the base's norm), one `scale` x."""
    base, small, large = sites(folder, FLOAT_LAYOUT, 3)
    for name, array in base.arrays().items():
        small.arrays()[name][...] = array + (0.1 * array).astype(array.dtype)
        large.arrays()[name][...] = array + (scale * array).astype(array.dtype)
    return base, small, large


def test_an_update_above_max_update_norm_is_refused_and_one_below_is_kept(tmp_path):
    base, small, large = norm_sites(tmp_path, scale=5.0)
    fedavg, output = aggregate(tmp_path, FLOAT_LAYOUT)
    fedavg.begin(output, base=base)
    kept = fedavg.contribution(1.0, max_update_norm=2.0)
    fold_all(kept, small)
    kept.complete()
    assert 0.09 < np.sqrt(kept.update_squares) / fedavg.norms.base_norm < 0.11
    refused = fedavg.contribution(1.0, max_update_norm=2.0)
    with pytest.raises(
        UpdateRefused,
        match="update norm at least [0-9.]+ x the global model's is above max_update_norm = 2",
    ):
        fold_all(refused, large)  # refused as soon as its partial norm is too large, before the end
    assert refused.folded_chunks < len(list(large.manifest.chunks()))


def test_the_first_update_of_a_round_is_checked_once_complete(tmp_path):
    base, _, large = norm_sites(tmp_path, scale=3.0)
    fedavg, output = aggregate(tmp_path, FLOAT_LAYOUT)
    fedavg.begin(output, base=base)
    first = fedavg.contribution(1.0, max_update_norm=2.0)
    with pytest.raises(UpdateRefused, match="update norm (at least )?3 x"):
        fold_all(first, large)  # the global model's norm is known with its last chunk
        first.complete()
    assert first.folded_chunks == len(list(large.manifest.chunks())) - 1
    first.abandon()
    assert fedavg.tainted


def test_a_delta_s_norm_is_its_own(tmp_path):
    base, _, _ = norm_sites(tmp_path, scale=1.0)
    delta = create_model(tmp_path / "delta.safetensors", FLOAT_LAYOUT)
    for name, array in base.arrays().items():
        delta.arrays()[name][...] = (0.5 * array).astype(array.dtype)
    fedavg, output = aggregate(tmp_path, FLOAT_LAYOUT)
    fedavg.begin(output, base=base)
    contribution = fedavg.contribution(1.0, update=True, max_update_norm=1.0)
    fold_all(contribution, delta)
    contribution.complete()
    assert 0.49 < np.sqrt(contribution.update_squares) / fedavg.norms.base_norm < 0.51


def test_an_average_that_overflows_its_dtype_fails_the_round(tmp_path):
    layout = [("x", "F16", (4,))]
    base = ModelFile.create(tmp_path / "base.safetensors", manifest_of(layout))
    base.arrays()["x"][:] = 60000.0
    delta = ModelFile.create(tmp_path / "delta.safetensors", manifest_of(layout))
    delta.arrays()["x"][:] = 60000.0  # finite, but base + delta is not a float16
    fedavg, output = aggregate(tmp_path, layout)
    fedavg.begin(output, base=base)
    contribution = fedavg.contribution(1.0, update=True)
    fold_all(contribution, delta)
    contribution.complete()
    with pytest.raises(JobError, match="new value of tensor 'x' overflows its dtype"):
        finish(fedavg)


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), 0.0, -1.0])
def test_a_weight_that_is_not_finite_and_positive_is_refused(tmp_path, weight):
    fedavg, _ = aggregate(tmp_path, FLOAT_LAYOUT)
    with pytest.raises(ValueError, match="finite and positive"):
        fedavg.contribution(weight)


def test_a_refusal_in_a_contribution_s_first_chunk_still_taints_the_round(tmp_path):
    """The refused chunk was partly added into sums other sites had made: it must not stay."""
    honest = sites(tmp_path, FLOAT_LAYOUT, 1)
    hostile = create_model(
        tmp_path / "hostile.safetensors", FLOAT_LAYOUT, fill=fill_exact_values, seed=7
    )
    hostile.arrays()["double"][0] = np.nan  # the first tensor: the widest elements go first
    fedavg, _ = aggregate(tmp_path, FLOAT_LAYOUT)
    fedavg.fold_model(honest[0], 1.0)
    contribution = fedavg.contribution(1.0)
    chunk = next(fedavg.manifest.chunks())
    with pytest.raises(UpdateRefused):
        contribution.fold(chunk, values(hostile, chunk))
    contribution.abandon()
    assert fedavg.tainted
