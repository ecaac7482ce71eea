"""Model files: safetensors on disk seen through one memory map; compatibility with the
safetensors library both ways, and hostile files refused before they are mapped."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from helpers import (
    MIXED_LAYOUT,
    create_model,
    fill_exact_values,
    manifest_of,
    tensor_bytes,
)
from safetensors.numpy import load_file, save_file

from hauler.core.errors import RemoteProtocolError
from hauler.model import ModelFile, read_manifest
from hauler.model.manifest import MAX_HEADER_BYTES


def write_safetensors(
    path, header: object, data: bytes = b"", *, header_len: int | None = None
) -> None:
    body = json.dumps(header).encode() if not isinstance(header, bytes) else header
    body += b" " * (-len(body) % 8)
    path.write_bytes(
        struct.pack("<Q", len(body) if header_len is None else header_len) + body + data
    )


def test_created_file_reopens_with_the_same_layout_and_bytes(tmp_path):
    with create_model(tmp_path / "m.safetensors", MIXED_LAYOUT, seed=3) as model:
        written = tensor_bytes(model)
        manifest = model.manifest
    with ModelFile.open(tmp_path / "m.safetensors", chunk_bytes=manifest.chunk_bytes) as reopened:
        assert reopened.manifest.same_layout(manifest)
        assert tensor_bytes(reopened) == written
        assert reopened.compute_digests() == manifest  # digests depend on the bytes only


def test_arrays_are_views_of_the_file(tmp_path):
    with ModelFile.create(tmp_path / "m.safetensors", manifest_of(MIXED_LAYOUT)) as model:
        model.arrays()["weights"][7] = 42.5
        model.arrays()["scalar"][...] = -1.25
        model.flush()
    arrays = load_file(str(tmp_path / "m.safetensors"))
    assert arrays["weights"][7] == np.float32(42.5) and arrays["scalar"] == np.float32(-1.25)


def test_hauler_files_load_with_safetensors(tmp_path):
    with create_model(
        tmp_path / "m.safetensors", MIXED_LAYOUT, fill=fill_exact_values, seed=5
    ) as model:
        expected = {name: np.array(array) for name, array in model.arrays().items()}
    loaded = load_file(str(tmp_path / "m.safetensors"))
    assert sorted(loaded) == sorted(name for name, _, _ in MIXED_LAYOUT)
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape, name
        assert np.array_equal(loaded[name], array), name


def test_safetensors_files_open_as_model_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "z.weight": rng.standard_normal((33, 17)).astype(np.float32),
        "a.half": rng.standard_normal(1001).astype(np.float16),
        "m.brain": rng.standard_normal(2049).astype(ml_dtypes.bfloat16),
        "count": np.array(7, np.int64),
        "empty": np.zeros((0, 5), np.float32),
        "mask": rng.integers(0, 2, 31).astype(bool),
        "double": rng.standard_normal(3).astype(np.float64),
    }
    save_file(arrays, str(tmp_path / "s.safetensors"))
    with ModelFile.open(tmp_path / "s.safetensors", chunk_bytes=4096) as model:
        opened = model.arrays()
        assert sorted(opened) == sorted(arrays)
        for name, array in arrays.items():
            assert opened[name].dtype == array.dtype and opened[name].shape == array.shape, name
            assert np.array_equal(opened[name], array), name


def test_empty_tensor_listed_after_a_tensor_at_the_same_offset_is_accepted(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I64", "shape": [0], "data_offsets": [0, 0]},
    }
    write_safetensors(tmp_path / "m.safetensors", header, np.ones(2, np.float32).tobytes())
    assert sorted(load_file(str(tmp_path / "m.safetensors"))) == ["a", "b"]  # safetensors takes it
    with ModelFile.open(tmp_path / "m.safetensors") as model:
        assert np.array_equal(model.arrays()["a"], np.ones(2, np.float32))


F32_2 = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
HOSTILE_FILES = {
    "too_short": (b"\x01\x02", b"", None),
    "header_length_past_the_limit": (F32_2, bytes(8), MAX_HEADER_BYTES + 1),
    "header_length_past_the_file": (F32_2, bytes(8), 4096),
    "header_not_json": (b"{not json", bytes(8), None),
    "header_not_an_object": ([1, 2], bytes(8), None),
    "entry_without_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), None),
    "entry_not_an_object": ({"w": [0, 8]}, bytes(8), None),
    "data_shorter_than_described": (F32_2, bytes(4), None),
    "data_longer_than_described": (F32_2, bytes(12), None),
    "offsets_with_a_hole": (
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        bytes(12),
        None,
    ),
    "shape_disagrees_with_offsets": (
        {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        bytes(8),
        None,
    ),
    "huge_tensor_in_a_small_file": (
        {"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}},
        bytes(8),
        None,
    ),
    "unknown_dtype": (
        {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
        bytes(8),
        None,
    ),
}


@pytest.mark.parametrize(
    "header, data, header_len", HOSTILE_FILES.values(), ids=HOSTILE_FILES.keys()
)
def test_hostile_file_is_refused_before_it_is_mapped(tmp_path, header, data, header_len):
    path = tmp_path / "hostile.safetensors"
    if header == b"\x01\x02":
        path.write_bytes(header)
    else:
        write_safetensors(path, header, data, header_len=header_len)
    assert_refused_without_allocating(path)


def test_header_length_past_the_end_of_the_file_is_refused_before_reading_it(tmp_path):
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(
        struct.pack("<Q", MAX_HEADER_BYTES) + b'{"w": 1}'
    )  # 16 bytes claiming a 100 MB header
    assert_refused_without_allocating(path)


def assert_refused_without_allocating(path):
    """Opening `path` raises RemoteProtocolError having allocated less than 1 MiB."""
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            ModelFile.open(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_read_manifest_reports_where_data_starts(tmp_path):
    save_file({"a": np.arange(3, dtype=np.int32)}, str(tmp_path / "s.safetensors"))
    manifest, data_start = read_manifest(tmp_path / "s.safetensors", 4096)
    raw = (tmp_path / "s.safetensors").read_bytes()
    assert raw[data_start:] == np.arange(3, dtype=np.int32).tobytes()
    assert manifest.layout() == [("a", "I32", (3,))]


def test_create_reuses_the_inode_of_a_retired_file(tmp_path):
    manifest = manifest_of(MIXED_LAYOUT)
    ModelFile.create(tmp_path / "round-0.safetensors", manifest).close()
    inode = os.stat(tmp_path / "round-0.safetensors").st_ino
    with ModelFile.create(
        tmp_path / "round-2.safetensors", manifest, reuse=tmp_path / "round-0.safetensors"
    ) as model:
        assert os.stat(model.path).st_ino == inode
    assert not (tmp_path / "round-0.safetensors").exists()


def test_create_over_an_existing_file_resizes_it_for_the_new_layout(tmp_path):
    path = tmp_path / "m.safetensors"
    create_model(path, [("a", "F32", (100_000,))]).close()
    with create_model(path, MIXED_LAYOUT, fill=fill_exact_values) as model:
        expected = {name: np.array(array) for name, array in model.arrays().items()}
    assert (
        os.path.getsize(path)
        == len(model.manifest.safetensors_header()) + model.manifest.total_bytes
    )
    loaded = load_file(str(path))
    assert all(np.array_equal(loaded[name], array) for name, array in expected.items())
