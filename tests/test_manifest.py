"""Manifests: layout arithmetic, the JSON round trip, and refusal of hostile manifests
before anything is allocated (DESIGN.md invariant 6, STYLE.md habit 5)."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from helpers import MIXED_LAYOUT, manifest_of
from hypothesis import given
from hypothesis import strategies as st

from hauler.core.errors import RemoteProtocolError
from hauler.model import DTYPES, ChunkPlan, Manifest, ModelFile
from hauler.model.manifest import (
    MAX_CHUNK_BYTES,
    MAX_DIMS,
    MAX_MODEL_BYTES,
    MAX_NAME_BYTES,
    MAX_TENSORS,
)

names = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "Pc", "Pd")), min_size=1, max_size=20
).filter(lambda name: name != "__metadata__")
layouts = st.lists(
    st.tuples(
        names, st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 40), max_size=3).map(tuple)
    ),
    max_size=8,
    unique_by=lambda t: t[0],
)
chunk_sizes = st.integers(1, 64).map(lambda k: 8 * k)


def valid_json(**changes: object) -> dict:
    """A valid two-tensor manifest's JSON, with `changes` applied to its second row."""
    rows = [["a", "F32", [4], 0, 16, ""], ["b", "I64", [2, 3], 16, 48, ""]]
    fields = ["name", "dtype", "shape", "offset", "length", "digest"]
    for key, value in changes.items():
        rows[1][fields.index(key)] = value
    return {"chunk_bytes": 4096, "tensors": rows}


@given(layouts, chunk_sizes)
def test_json_round_trip_keeps_every_field(layout, chunk_bytes):
    manifest = Manifest.build(layout, chunk_bytes)
    digests = [f"{index:016x}" for index in range(len(manifest.tensors))]
    manifest = manifest.with_digests(digests)
    assert Manifest.from_json(manifest.to_json()) == manifest


@given(layouts, chunk_sizes)
def test_tensors_tile_the_data_region_widest_first_each_aligned(layout, chunk_bytes):
    manifest = Manifest.build(layout, chunk_bytes)
    widest_first = sorted(layout, key=lambda row: -DTYPES[row[1]].itemsize)  # stable
    assert [t.name for t in manifest.tensors] == [name for name, _, _ in widest_first]
    position = 0
    for tensor, (name, dtype, shape) in zip(manifest.tensors, widest_first):
        assert (tensor.name, tensor.offset) == (name, position)
        assert tensor.length == DTYPES[dtype].itemsize * int(math.prod(shape))
        assert tensor.offset % DTYPES[dtype].itemsize == 0
        position += tensor.length
    assert manifest.total_bytes == position


@given(layouts, chunk_sizes, st.integers(0, 200))
def test_chunks_tile_the_data_region_and_their_pieces_tile_every_tensor(
    layout, chunk_bytes, start_seq
):
    manifest = Manifest.build(layout, chunk_bytes)
    chunks = list(manifest.chunks())
    plan = ChunkPlan(manifest)
    assert plan.total == len(chunks) == manifest.chunk_count()
    assert [plan.chunk(seq) for seq in range(plan.total)] == chunks
    assert list(manifest.chunks(start_seq)) == chunks[start_seq:]
    assert [c.offset for c in chunks] == list(range(0, manifest.total_bytes, chunk_bytes))
    assert all(0 < c.length <= chunk_bytes for c in chunks)
    assert sum(c.length for c in chunks) == manifest.total_bytes
    pieces = [(c, p) for c in chunks for p in plan.pieces(c)]
    firsts, counts = plan.chunk_spans()
    for index, tensor in enumerate(manifest.tensors):
        mine = [(c, p) for c, p in pieces if p.tensor == index]
        assert [p.offset for _, p in mine] == [start for start, _ in manifest.tensor_pieces(tensor)]
        assert sum(p.length for _, p in mine) == tensor.length
        seqs = range(firsts[index], firsts[index] + counts[index])
        assert [c.seq for c, _ in mine] == list(seqs)
        assert all(c.offset + p.start == tensor.offset + p.offset for c, p in mine)
        assert all(p.length % tensor.itemsize == 0 for _, p in mine)  # whole elements only


def test_a_tied_name_is_stored_once_and_kept_through_json_and_files(tmp_path):
    layout = [("wte", "F32", (8, 4)), ("lm_head", "F32", (8, 4), "wte"), ("b", "F16", (3,))]
    manifest = Manifest.build(layout, 64)
    assert manifest.names == ["wte", "b"] and manifest.ties == (("lm_head", "wte"),)
    assert Manifest.from_json(manifest.to_json()) == manifest
    with ModelFile.create(tmp_path / "tied.safetensors", manifest) as model:
        arrays = model.arrays()
        arrays["wte"][...] = 3.0
        assert np.shares_memory(arrays["lm_head"], arrays["wte"])
    with ModelFile.open(tmp_path / "tied.safetensors", chunk_bytes=64) as model:
        assert model.manifest.ties == manifest.ties
        assert float(model.arrays()["lm_head"].sum()) == 3.0 * 32


@pytest.mark.parametrize(
    "layout",
    [
        [("a", "F32", (4,)), ("b", "F32", (4,), "missing")],
        [("a", "F32", (4,)), ("b", "F32", (2, 2), "a")],
        [("a", "F32", (4,)), ("b", "F16", (4,), "a")],
    ],
    ids=["no-such-tensor", "other-shape", "other-dtype"],
)
def test_a_tie_to_a_tensor_not_alike_is_refused(layout):
    with pytest.raises(RemoteProtocolError, match="tied"):
        Manifest.build(layout, 64)


def test_an_unaligned_tensor_is_refused_naming_it():
    rows = [["h", "F16", [1], 0, 2, ""], ["w", "F32", [1], 2, 4, ""]]
    with pytest.raises(RemoteProtocolError, match="'w'.*multiple of its element size"):
        Manifest.from_json({"chunk_bytes": 64, "tensors": rows})


def test_same_layout_ignores_digests_but_not_shapes():
    manifest = manifest_of(MIXED_LAYOUT)
    assert manifest.same_layout(manifest.with_digests(["x"] * len(manifest.tensors)))
    other = list(MIXED_LAYOUT)
    other[1] = ("weights", "F32", (10_000,))
    assert not manifest.same_layout(manifest_of(other))
    assert not manifest.same_layout(manifest_of(MIXED_LAYOUT, chunk_bytes=8192))


def test_a_model_digest_changes_with_any_tensor_digest_layout_tie_or_chunk_size():
    """What a site's marker names and a delta's base is: the same model parsed again has it."""

    def digested(layout: list, chunk_bytes: int = 4096, last: str = "b") -> str:
        manifest = manifest_of(layout, chunk_bytes)
        count = len(manifest.tensors)
        return manifest.with_digests(["a"] * (count - 1) + [last]).digest

    model = manifest_of(MIXED_LAYOUT, 4096).with_digests(["a"] * (len(MIXED_LAYOUT) - 1) + ["b"])
    assert Manifest.from_json(model.to_json()).digest == model.digest == digested(MIXED_LAYOUT)
    tied = [*MIXED_LAYOUT, ("alias", "F32", (10_001,), "weights")]
    other_shape = [("tiny", "I8", (4,)) if row[0] == "tiny" else row for row in MIXED_LAYOUT]
    variants = [
        digested(MIXED_LAYOUT, last="c"),
        digested(MIXED_LAYOUT, chunk_bytes=8192),
        digested(tied),
        digested(other_shape),
    ]
    assert len({model.digest, *variants}) == 5


HOSTILE = {
    "shape_times_dtype_is_not_length": valid_json(length=40),
    "length_claims_more_than_shape": valid_json(length=1 << 40),
    "offset_leaves_a_hole": valid_json(offset=24),
    "offset_overlaps": valid_json(offset=8),
    "negative_offset": valid_json(offset=-16),
    "float_offset": valid_json(offset=16.0),
    "2**50_elements": valid_json(shape=[1 << 50], length=8 << 50),
    "product_of_dims_overflows_int64": valid_json(
        shape=[1 << 32, 1 << 32, 1 << 32], length=8 << 96
    ),
    "negative_dimension": valid_json(shape=[-2, -3], length=48),
    "float_dimension": valid_json(shape=[2.0, 3], length=48),
    "too_many_dims": valid_json(shape=[1] * (MAX_DIMS + 1), length=8),
    "unknown_dtype": valid_json(dtype="F128"),
    "lowercase_dtype": valid_json(dtype="f32"),
    "object_dtype": valid_json(dtype="O"),
    "name_with_newline": valid_json(name="b\nc"),
    "name_with_nul": valid_json(name="b\x00"),
    "name_with_escape": valid_json(name="\x1b[31mred"),
    "empty_name": valid_json(name=""),
    "name_too_long": valid_json(name="n" * (MAX_NAME_BYTES + 1)),
    "metadata_name": valid_json(name="__metadata__"),
    "duplicate_name": valid_json(name="a"),
    "row_too_short": {"chunk_bytes": 4096, "tensors": [["a", "F32", [4], 0, 16]]},
    "row_is_an_object": {"chunk_bytes": 4096, "tensors": [{"name": "a"}]},
    "shape_not_a_list": valid_json(shape=6),
    "tensors_not_a_list": {"chunk_bytes": 4096, "tensors": {"a": 1}},
    "no_tensors_key": {"chunk_bytes": 4096},
    "no_chunk_bytes": {"tensors": []},
    "chunk_bytes_not_multiple_of_8": {"chunk_bytes": 4100, "tensors": []},
    "chunk_bytes_zero": {"chunk_bytes": 0, "tensors": []},
    "chunk_bytes_too_large": {"chunk_bytes": MAX_CHUNK_BYTES + 8, "tensors": []},
    "chunk_bytes_string": {"chunk_bytes": "4096", "tensors": []},
    "not_an_object": ["chunk_bytes", 4096],
    "null": None,
    "tie_to_nothing": {**valid_json(), "ties": [["c", "z"]]},
    "tie_twice": {**valid_json(), "ties": [["c", "a"], ["c", "b"]]},
    "tie_over_a_tensor": {**valid_json(), "ties": [["a", "b"]]},
    "tie_not_a_pair": {**valid_json(), "ties": [["c"]]},
    "ties_not_a_list": {**valid_json(), "ties": {"c": "a"}},
    "model_larger_than_the_limit": {
        "chunk_bytes": 4096,
        "tensors": [
            ["a", "U8", [MAX_MODEL_BYTES], 0, MAX_MODEL_BYTES, ""],
            ["b", "U8", [1], MAX_MODEL_BYTES, 1, ""],
        ],
    },
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_manifest_is_refused(data):
    with pytest.raises(RemoteProtocolError):
        Manifest.from_json(data)


def test_too_many_tensors_are_refused_before_they_are_parsed():
    rows = [["t", "U8", [0], 0, 0, ""]] * (MAX_TENSORS + 1)
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            Manifest.from_json({"chunk_bytes": 4096, "tensors": rows})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # refused on the count: not one TensorEntry per row was built


@pytest.mark.parametrize(
    "data",
    [
        HOSTILE["2**50_elements"],
        HOSTILE["length_claims_more_than_shape"],
        HOSTILE["model_larger_than_the_limit"],
    ],
    ids=["2**50", "length", "total"],
)
def test_refusal_allocates_nothing_model_sized(data):
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            Manifest.from_json(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_error_names_the_tensor_at_fault():
    with pytest.raises(RemoteProtocolError, match="'b'"):
        Manifest.from_json(valid_json(offset=24))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats()
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=40,
)


@given(json_values)
def test_random_json_is_refused_only_with_remote_protocol_error(data):
    try:
        manifest = Manifest.from_json(data)
    except RemoteProtocolError:
        return
    assert Manifest.from_json(manifest.to_json()) == manifest


@given(st.integers(0, 1), st.integers(0, 5), json_values)
def test_one_corrupted_field_is_refused_only_with_remote_protocol_error(row, field, value):
    data = valid_json()
    data["tensors"][row][field] = value
    try:
        manifest = Manifest.from_json(data)
    except RemoteProtocolError:
        return
    manifest.validate()
    assert manifest.total_bytes == 64
