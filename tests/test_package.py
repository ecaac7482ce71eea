"""Job packages: a job folder zipped for the control plane, and unpacked only when every
entry stays inside the job folder (absolute paths, `..` and links are refused by name)."""

from __future__ import annotations

import base64
import io
import stat
import zipfile

import numpy as np
import pytest
from helpers import EXAMPLE, hello_job

from hauler.core.errors import ConfigError, JobError
from hauler.core.package import load_job_module, pack, unpack

MAX = 1 << 20
JOB_TOML = 'name = "j"\n[model]\nmodule = "model"\n[executor]\nmodule = "train"\n'


def archive(*entries: tuple[str | zipfile.ZipInfo, bytes], job_toml: bool = True) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        if job_toml:
            zipped.writestr("job.toml", JOB_TOML)
        for name, content in entries:
            zipped.writestr(name, content)
    return base64.b64encode(buffer.getvalue()).decode()


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
    unpacked = sorted(p.relative_to(tmp_path / "unpacked").as_posix() for p in (tmp_path / "unpacked").rglob("*"))
    assert unpacked == ["data", "data/notes.txt", "job.toml", "model.py", "train.py"]
    assert (tmp_path / "unpacked" / "model.py").read_bytes() == (EXAMPLE / "model.py").read_bytes()


def test_unpacked_modules_import_privately_per_job(tmp_path):
    unpack(pack(hello_job(tmp_path), MAX), tmp_path / "app", MAX)
    module = load_job_module(tmp_path / "app", "abc123", "model")
    assert module.__name__ == "hauler_job_abc123.model"
    assert module.layout({"arrays": 2, "array_bytes": 8}) == [("array_0", "F32", (2,)), ("array_1", "F32", (2,))]
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
