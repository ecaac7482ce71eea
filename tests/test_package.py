"""Job packages: a job folder zipped for the control plane, and unpacked as hostile input:
every entry must stay inside the job folder and be a plain file or folder, the archive must
be exactly what its headers say, and a refused package leaves nothing behind (a JobError,
never zipfile's, zlib's or the OS's own errors). `code_digest` names a job's code."""

from __future__ import annotations

import base64
import hashlib
import io
import stat
import struct
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import EXAMPLE, hello_job
from hypothesis import given
from hypothesis import strategies as st

from hauler.core import package as package_module
from hauler.core.errors import ConfigError, JobError
from hauler.core.package import MAX_ENTRIES, code_digest, load_job_module, pack, unpack

MAX = 1 << 20
JOB_TOML = 'name = "j"\n[model]\nmodule = "model"\n[executor]\nmodule = "train"\n'


def zip_bytes(
    *entries: tuple[str | zipfile.ZipInfo, bytes],
    job_toml: bool = True,
    method: int = zipfile.ZIP_DEFLATED,
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as zipped, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": some tests mean it
        if job_toml:
            zipped.writestr("job.toml", JOB_TOML)
        for name, content in entries:
            zipped.writestr(name, content)
    return buffer.getvalue()


def archive(*entries: tuple[str | zipfile.ZipInfo, bytes], job_toml: bool = True) -> str:
    return b64(zip_bytes(*entries, job_toml=job_toml))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def test_pack_then_unpack_gives_back_the_job_folder(tmp_path):
    job_dir = hello_job(tmp_path)
    (job_dir / "__pycache__").mkdir()
    (job_dir / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"stale")
    (job_dir / "data").mkdir()
    (job_dir / "data" / "notes.txt").write_text("kept")
    job = unpack(pack(job_dir, MAX), tmp_path / "unpacked", MAX)
    assert job.name == "hello-numpy" and job.workflow.num_rounds == 2
    unpacked = sorted(
        p.relative_to(tmp_path / "unpacked").as_posix() for p in (tmp_path / "unpacked").rglob("*")
    )
    assert unpacked == ["data", "data/notes.txt", "job.toml", "model.py", "train.py"]
    assert (tmp_path / "unpacked" / "model.py").read_bytes() == (EXAMPLE / "model.py").read_bytes()


def test_unpacked_modules_import_privately_per_job(tmp_path):
    unpack(pack(hello_job(tmp_path), MAX), tmp_path / "app", MAX)
    module = load_job_module(tmp_path / "app", "abc123", "model")
    assert module.__name__ == "hauler_job_abc123.model"
    assert module.layout({"arrays": 2, "array_bytes": 8}) == [
        ("array_0", "F32", (2,)),
        ("array_1", "F32", (2,)),
    ]
    with pytest.raises(JobError, match="'nope'"):
        load_job_module(tmp_path / "app", "abc123", "nope")


ESCAPES = {
    "absolute": ("/etc/cron.d/evil", "absolute"),
    "absolute_backslash": ("\\evil.py", "absolute"),
    "drive_letter": ("C:/evil.py", "absolute"),
    "parent": ("../evil.py", "escapes"),
    "parent_in_the_middle": ("app/../../evil.py", "escapes"),
    "backslash_parent": ("..\\evil.py", "escapes"),
}


@pytest.mark.parametrize("name, reason", ESCAPES.values(), ids=ESCAPES.keys())
def test_entry_outside_the_job_folder_is_refused_by_name(tmp_path, name, reason):
    target = tmp_path / "jobs" / "j1" / "app"
    with pytest.raises(JobError) as raised:
        unpack(archive((name, b"import os")), target, MAX)
    assert repr(name) in str(raised.value) and reason in str(raised.value)
    assert not target.exists()  # refused before a byte was written
    assert not (tmp_path / "jobs" / "evil.py").exists() and not (tmp_path / "evil.py").exists()


def test_symlink_entry_is_refused_by_name(tmp_path):
    with pytest.raises(JobError, match="'model.py' is a link"):
        unpack(archive((symlink("model.py"), b"/etc/passwd")), tmp_path / "app", MAX)
    assert not (tmp_path / "app").exists()


@pytest.mark.parametrize("name", ["", "."])
def test_entry_with_an_empty_path_is_refused(tmp_path, name):
    with pytest.raises(JobError):
        unpack(archive((zipfile.ZipInfo(name), b"x")), tmp_path / "app", MAX)


def test_package_that_is_not_a_zip_is_refused(tmp_path):
    with pytest.raises(JobError, match="not a base64 zip"):
        unpack("%%% not base64", tmp_path / "app", MAX)
    with pytest.raises(JobError, match="not a base64 zip"):
        unpack(base64.b64encode(b"PK but not really").decode(), tmp_path / "app", MAX)


def test_oversized_package_is_refused(tmp_path):
    package = archive(("weights.bin", np.random.default_rng(0).bytes(2000)))  # incompressible
    with pytest.raises(JobError, match="exceeds"):
        unpack(package, tmp_path / "app", 1000)


def test_package_that_expands_too_much_is_refused(tmp_path):
    with pytest.raises(JobError, match="expands"):
        unpack(archive(("zeros.bin", bytes(10 * MAX))), tmp_path / "app", MAX)
    assert not (tmp_path / "app").exists()


def test_package_without_job_toml_is_refused(tmp_path):
    with pytest.raises(JobError, match="no job.toml"):
        unpack(archive(("model.py", b""), job_toml=False), tmp_path / "app", MAX)


def test_job_toml_inside_a_package_is_validated(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("job.toml", JOB_TOML.replace('name = "j"', 'name = "j"\nowner = "me"'))
    with pytest.raises(ConfigError, match="job.toml: owner: unknown key"):
        unpack(base64.b64encode(buffer.getvalue()).decode(), tmp_path / "app", MAX)


def test_pack_validates_the_job_first(tmp_path):
    job_dir = hello_job(tmp_path)
    (job_dir / "job.toml").write_text((job_dir / "job.toml").read_text() + "\n[extra]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"job.toml: extra: unknown key"):
        pack(job_dir, MAX)


def test_pack_refuses_a_folder_over_the_limit(tmp_path):
    job_dir = hello_job(tmp_path)
    (job_dir / "data.bin").write_bytes(np.random.default_rng(0).bytes(1 << 20))  # incompressible
    with pytest.raises(ConfigError, match="exceeds"):
        pack(job_dir, 64 << 10)


# Hostile archives, built by hand: each must be refused with a JobError naming what is wrong,
# leaving neither the target nor a temporary folder nor the folders made for them.

CRC, COMPRESSED, SIZE, FLAGS, METHOD = 16, 20, 24, 8, 10  # field offsets in a central header


def central_header(data: bytes, name: str) -> int:
    """Offset of `name`'s header in the central directory of the zip `data`."""
    at = zipfile.ZipFile(io.BytesIO(data)).start_dir
    while data[at : at + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        if data[at + 46 : at + 46 + name_len] == name.encode():
            return at
        at += 46 + name_len + extra_len + comment_len
    raise KeyError(name)


def patched(data: bytes, name: str, field: int, value: int) -> bytes:
    """The zip `data` with one field of `name`'s central directory header rewritten."""
    at = central_header(data, name) + field
    width = 2 if field in (FLAGS, METHOD) else 4
    return data[:at] + value.to_bytes(width, "little") + data[at + width :]


def refused(package: str, tmp_path: Path, max_bytes: int = MAX) -> str:
    """unpack's JobError message for `package`, once checked that nothing was left behind."""
    target = tmp_path / "site" / "jobs" / "j1" / "app"
    with pytest.raises(JobError) as raised:
        unpack(package, target, max_bytes)
    assert type(raised.value) is JobError
    assert not (tmp_path / "site").exists()  # no target, no temporary folder, no parents
    return str(raised.value)


def model_py(method: int, content: bytes = b"x = 1\n" * 50) -> tuple[bytes, zipfile.ZipInfo]:
    data = zip_bytes(("model.py", content), method=method)
    return data, zipfile.ZipFile(io.BytesIO(data)).getinfo("model.py")


@pytest.mark.parametrize(
    "method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"]
)
@pytest.mark.parametrize(
    "change, expected",
    [
        (-10, "'model.py' cannot be unpacked: BadZipFile: Bad CRC-32 for file 'model.py'"),
        (+10, "'model.py' holds 300 bytes, not the 310 its header declares"),
    ],
    ids=["smaller", "larger"],
)
def test_central_directory_lying_about_a_size_is_refused(tmp_path, method, change, expected):
    data, entry = model_py(method)
    assert entry.file_size == 300
    message = refused(b64(patched(data, "model.py", SIZE, entry.file_size + change)), tmp_path)
    assert message == f"job package entry {expected}"


def test_central_directory_lying_about_a_compressed_size_is_refused(tmp_path):
    data, entry = model_py(zipfile.ZIP_DEFLATED)
    lying = patched(data, "model.py", COMPRESSED, entry.compress_size + 1000)
    assert refused(b64(lying), tmp_path) == (
        f"job package entry 'model.py' declares {entry.compress_size + 1000} bytes of data, "
        "more than lie before the next entry"
    )


def test_entries_sharing_their_data_are_refused(tmp_path):
    data = zip_bytes(("a.py", b"x = 1\n" * 50), ("b.py", b"x = 1\n" * 50))
    offset = struct.unpack_from("<I", data, central_header(data, "a.py") + 42)[0]
    shared = patched(data, "b.py", 42, offset)  # b.py's data is a.py's: a "flat" zip bomb
    assert "more than lie before the next entry" in refused(b64(shared), tmp_path)


def test_flipped_byte_in_stored_data_fails_its_crc(tmp_path):
    data, entry = model_py(zipfile.ZIP_STORED)
    at = data.index(b"x = 1\n", entry.header_offset)
    message = refused(b64(data[:at] + b"y" + data[at + 1 :]), tmp_path)
    assert "'model.py'" in message and "CRC" in message


def test_zip_bomb_declaring_a_tiny_size_is_refused_after_that_size(tmp_path):
    data, entry = model_py(zipfile.ZIP_DEFLATED, bytes(16 << 20))  # 16 KiB packed, cap is 4 MiB
    started = time.monotonic()
    message = refused(b64(patched(data, "model.py", SIZE, 10)), tmp_path)
    assert "'model.py'" in message and "CRC" in message
    assert time.monotonic() - started < 5  # reads 10 bytes of it, never 16 MiB


def test_honest_bomb_is_stopped_by_the_bytes_really_written(tmp_path, monkeypatch):
    written: list[int] = []
    write_file = package_module._write_file

    def counted(*arguments: object) -> int:
        written.append(write_file(*arguments))
        return written[-1]

    monkeypatch.setattr(package_module, "_write_file", counted)
    package = archive(*((f"part{i}.bin", bytes(256 << 10)) for i in range(20)))  # 5 MiB in all
    message = refused(package, tmp_path)
    assert message == "job package expands past 4 times its size limit, at entry 'part15.bin'"
    assert len(written) == 16  # job.toml and part0..part14, whole
    assert sum(written) <= 4 * MAX < sum(written) + (256 << 10)  # stopped at the cap, not before


CLASHES = {
    "file_then_folder": [("a", b""), ("a/b", b"")],
    "folder_then_file": [("a/b/c", b""), ("a/b", b"")],
    "file_and_folder_entry": [("a", b""), ("a/", b"")],
    "duplicate": [("model.py", b"1"), ("model.py", b"2")],
    "duplicate_once_normalised": [("model.py", b"1"), ("./model.py", b"2")],
}


@pytest.mark.parametrize("entries", CLASHES.values(), ids=CLASHES.keys())
def test_entries_claiming_the_same_path_are_refused(tmp_path, entries):
    message = refused(archive(*entries), tmp_path)
    assert "appears twice" in message or "both a file and a folder" in message


def test_names_differing_only_by_case_are_distinct_files(tmp_path):
    unpack(archive(("Model.py", b"big"), ("model.py", b"small")), tmp_path / "app", MAX)
    assert (tmp_path / "app" / "Model.py").read_bytes() == b"big"
    assert (tmp_path / "app" / "model.py").read_bytes() == b"small"


def with_mode(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


@pytest.mark.parametrize(
    "kind",
    [stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK],
    ids=["fifo", "char_device", "block_device", "socket"],
)
def test_special_files_are_refused_by_name(tmp_path, kind):
    message = refused(archive((with_mode("dev", kind | 0o666), b"")), tmp_path)
    assert message == "job package entry 'dev' is a device, FIFO or socket"


def test_symlink_is_refused_before_anything_is_written(tmp_path):
    assert "'lib' is a link" in refused(archive(("a.py", b""), (symlink("lib"), b"/etc")), tmp_path)


def test_encrypted_entry_is_refused(tmp_path):
    data = zip_bytes(("model.py", b"x = 1\n"))
    assert (
        refused(b64(patched(data, "model.py", FLAGS, 0x1)), tmp_path)
        == "job package entry 'model.py' is encrypted"
    )


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, 99])
def test_compression_methods_other_than_stored_and_deflated_are_refused(tmp_path, method):
    data = zip_bytes(("model.py", b"x = 1\n"), method=zipfile.ZIP_STORED)
    message = refused(b64(patched(data, "model.py", METHOD, method)), tmp_path)
    assert f"'model.py' uses compression method {method}" in message


@pytest.mark.parametrize(
    "name, reason",
    [
        ("/".join(["d"] * 33) + ".py", "nested deeper than 32"),
        ("x" * 256 + ".py", "longer"),
        ("/".join(["y" * 200] * 6), "longer than 1024 bytes"),
    ],
    ids=["deep", "long_name", "long_path"],
)
def test_paths_too_deep_or_long_are_refused(tmp_path, name, reason):
    message = refused(archive((name, b"")), tmp_path)
    assert repr(name) in message and reason in message


def test_more_entries_than_the_limit_are_refused_from_the_central_directory(tmp_path, monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zipped:
        zipped.writestr("job.toml", JOB_TOML)
        for index in range(120_000):
            zipped.writestr(f"f{index}", b"")
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("an entry was read"))
    message = refused(b64(buffer.getvalue()), tmp_path, max_bytes=64 << 20)
    assert message == f"job package has 120001 entries, more than the {MAX_ENTRIES} a job may hold"


def test_the_entry_limit_is_inclusive(tmp_path, monkeypatch):
    monkeypatch.setattr(package_module, "MAX_ENTRIES", 3)
    unpack(archive(("a.py", b""), ("b.py", b"")), tmp_path / "app", MAX)
    assert "4 entries" in refused(archive(("a.py", b""), ("b.py", b""), ("c.py", b"")), tmp_path)


def test_package_whose_job_toml_is_not_text_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("job.toml", b"\xff\xfe name")
    assert "job.toml: not valid TOML" in refused(b64(buffer.getvalue()), tmp_path)


def test_package_whose_job_toml_is_a_folder_is_refused(tmp_path):
    assert "no job.toml" in refused(archive(("job.toml/x", b""), job_toml=False), tmp_path)


# Unpacking over an existing job folder, and what it writes.


def test_valid_package_replaces_an_existing_target(tmp_path):
    target = tmp_path / "app"
    unpack(archive(("old.py", b"old")), target, MAX)
    unpack(archive(("new.py", b"new")), target, MAX)
    assert sorted(p.name for p in target.iterdir()) == ["job.toml", "new.py"]
    assert [p.name for p in tmp_path.iterdir()] == ["app"]  # nothing aside is left


def test_refused_package_leaves_an_existing_target_as_it_was(tmp_path):
    target = tmp_path / "app"
    unpack(archive(("old.py", b"old")), target, MAX)
    data, entry = model_py(zipfile.ZIP_STORED)
    with pytest.raises(JobError, match="CRC"):
        unpack(b64(patched(data, "model.py", CRC, entry.CRC ^ 1)), target, MAX)
    with pytest.raises(ConfigError):
        unpack(b64(zip_bytes(("job.toml", b"name = 1"), job_toml=False)), target, MAX)
    assert sorted(p.name for p in target.iterdir()) == ["job.toml", "old.py"]
    assert [p.name for p in tmp_path.iterdir()] == ["app"]


def test_unpacked_modes_are_plain_whatever_the_archive_says(tmp_path):
    package = archive(
        (with_mode("run.sh", stat.S_IFREG | 0o4777), b""),
        (with_mode("secret.py", stat.S_IFREG | 0o600), b""),
        (with_mode("lib/", stat.S_IFDIR | 0o1777), b""),
        ("lib/sub/x.py", b""),
    )
    unpack(package, tmp_path / "app", MAX)
    modes = {
        p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in [tmp_path / "app", *(tmp_path / "app").rglob("*")]
    }
    assert modes == {
        "app": 0o755,
        "app/job.toml": 0o644,
        "app/run.sh": 0o755,
        "app/secret.py": 0o644,
        "app/lib": 0o755,
        "app/lib/sub": 0o755,
        "app/lib/sub/x.py": 0o644,
    }


def test_ten_thousand_entries_unpack(tmp_path):
    package = archive(*((f"d{i // 100}/f{i}.py", b"x = 1\n") for i in range(MAX_ENTRIES - 1)))
    unpack(package, tmp_path / "app", 16 << 20)
    assert sum(1 for p in (tmp_path / "app").rglob("*") if p.is_file()) == MAX_ENTRIES


SMALL_PACKAGE = zip_bytes(
    ("model.py", b"x = 1\n" * 20),
    (zipfile.ZipInfo("data/"), b""),
    ("data/notes.txt", "naïve".encode()),
)


@given(
    st.lists(
        st.tuples(st.integers(0, len(SMALL_PACKAGE) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    st.integers(1, len(SMALL_PACKAGE)),
)
def test_corrupted_package_is_refused_or_unpacked_never_crashes(flips, length):
    data = bytearray(SMALL_PACKAGE)
    for at, value in flips:
        data[at] = value
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "jobs" / "app"
        try:
            unpack(b64(bytes(data[:length])), target, MAX)
        except (JobError, ConfigError):
            assert not (Path(folder) / "jobs").exists()
        else:
            assert (target / "job.toml").is_file()


# code_digest: what a locked-down site's `trusted_code` names.

# Names a job folder may hold and a package may carry: no separators, NUL, drive colons or
# surrogates; not ".", "..", the folders pack skips, or job.toml (written by the test).
PART = st.text(
    st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="/\\:"),
    min_size=1,
    max_size=8,
).filter(lambda part: part not in (".", "..", "job.toml", *package_module.SKIPPED))
TREE = st.dictionaries(
    st.lists(PART, min_size=1, max_size=3).map(tuple), st.binary(max_size=64), max_size=6
)


def leaves(tree: dict[tuple[str, ...], bytes]) -> dict[tuple[str, ...], bytes]:
    """The paths of `tree` that are not also folders of other paths, with their contents."""
    folders = {path[:depth] for path in tree for depth in range(1, len(path))}
    return {path: content for path, content in tree.items() if path not in folders}


@given(TREE)
def test_code_digest_of_an_unpacked_job_is_that_of_its_folder(tree):
    files = leaves(tree)
    with tempfile.TemporaryDirectory() as folder:
        job_dir = Path(folder) / "job"
        job_dir.mkdir()
        (job_dir / "job.toml").write_text(JOB_TOML)
        for parts, content in files.items():
            job_dir.joinpath(*parts).parent.mkdir(parents=True, exist_ok=True)
            job_dir.joinpath(*parts).write_bytes(content)
        unpack(pack(job_dir, MAX), Path(folder) / "unpacked", MAX)
        assert code_digest(Path(folder) / "unpacked") == code_digest(job_dir)


def test_code_digest_names_the_code_not_the_settings(tmp_path):
    job_dir = hello_job(tmp_path)
    digest = code_digest(job_dir)
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    job_toml = job_dir / "job.toml"
    job_toml.write_text(job_toml.read_text().replace("num_rounds = 2", "num_rounds = 9"))
    (job_dir / "__pycache__").mkdir()
    (job_dir / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"not packed")
    assert code_digest(job_dir) == digest
    model = job_dir / "model.py"
    changes = [
        ("an edit", lambda: model.write_bytes(model.read_bytes() + b"\n"), True),
        ("a new file, even empty", lambda: (job_dir / "helpers.py").write_text(""), True),
        ("a rename", lambda: (job_dir / "helpers.py").rename(job_dir / "helper.py"), True),
        ("an empty folder, never packed", lambda: (job_dir / "sub").mkdir(), False),
        ("a move", lambda: (job_dir / "helper.py").rename(job_dir / "sub" / "helper.py"), True),
    ]
    for what, change, changes_digest in changes:
        change()
        assert (code_digest(job_dir) != digest) == changes_digest, what
        digest = code_digest(job_dir)


def test_code_digest_follows_the_canonical_listing(tmp_path):
    job_dir = hello_job(tmp_path)
    (job_dir / "data").mkdir()
    (job_dir / "data" / "é.txt").write_bytes(b"kept")
    listing = b"".join(
        f"{name}\0{hashlib.sha256((job_dir / name).read_bytes()).hexdigest()}\n".encode()
        for name in ["data/é.txt", "model.py", "train.py"]
    )
    assert code_digest(job_dir) == "sha256:" + hashlib.sha256(listing).hexdigest()
