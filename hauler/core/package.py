"""Job packages: a job folder zipped for the control plane, and unpacked safely.

Unpacking refuses absolute paths, `..`, links and oversized archives before
writing a byte, naming the entry at fault.
"""

from __future__ import annotations

import base64
import importlib
import io
import stat
import sys
import tomllib
import types
import zipfile
from pathlib import Path, PurePosixPath

from hauler.core.config import JobConfig, load_toml, parse
from hauler.core.errors import ConfigError, JobError

JOB_FILE = "job.toml"
SKIPPED = {"__pycache__", ".git", ".venv"}


def load_job(job_dir: Path) -> JobConfig:
    """Read and validate a job folder's job.toml."""
    path = Path(job_dir) / JOB_FILE
    if not path.exists():
        raise ConfigError(f"{job_dir}: no {JOB_FILE}; a job is a folder with a job.toml and its code")
    return load_toml(JobConfig, path)


def pack(job_dir: Path, max_bytes: int) -> str:
    """Zip a job folder (validated first) and return it base64-encoded."""
    job_dir = Path(job_dir)
    load_job(job_dir)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(job_dir.rglob("*")):
            relative = path.relative_to(job_dir)
            if SKIPPED.intersection(relative.parts) or not path.is_file():
                continue
            archive.write(path, relative.as_posix())
            if buffer.tell() > max_bytes:
                raise ConfigError(f"{job_dir}: job package exceeds {max_bytes >> 20} MiB; keep data out of it")
    return base64.b64encode(buffer.getvalue()).decode()


def unpack(package_b64: str, target: Path, max_bytes: int) -> JobConfig:
    """Check every entry of a job package, extract it into `target`, and parse its job.toml."""
    try:
        data = base64.b64decode(package_b64, validate=True)
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (ValueError, zipfile.BadZipFile):
        raise JobError("job package is not a base64 zip archive") from None
    if len(data) > max_bytes:
        raise JobError(f"job package of {len(data)} bytes exceeds {max_bytes}")
    entries = archive.infolist()
    if sum(entry.file_size for entry in entries) > 4 * max_bytes:
        raise JobError("job package expands to more than four times its size limit")
    for entry in entries:
        _check_entry(entry)
    target.mkdir(parents=True, exist_ok=True)
    archive.extractall(target)
    try:
        return parse(JobConfig, _read_toml(target / JOB_FILE), JOB_FILE)
    except FileNotFoundError:
        raise JobError(f"job package has no {JOB_FILE}") from None


def _check_entry(entry: zipfile.ZipInfo) -> None:
    path = PurePosixPath(entry.filename)
    if not path.parts or path.parts == (".",):
        raise JobError(f"job package entry {entry.filename!r} has no name")
    if path.is_absolute() or entry.filename.startswith(("/", "\\")) or ":" in path.parts[0]:
        raise JobError(f"job package entry {entry.filename!r} is an absolute path")
    if ".." in path.parts or "\\" in entry.filename:
        raise JobError(f"job package entry {entry.filename!r} escapes the job folder")
    if stat.S_ISLNK(entry.external_attr >> 16):
        raise JobError(f"job package entry {entry.filename!r} is a link")


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise JobError(f"{JOB_FILE}: not valid TOML: {error}") from None


def load_job_module(app_dir: Path, job_id: str, module: str) -> types.ModuleType:
    """Import `module` from a job's unpacked folder, as part of a package private to the job."""
    package = f"hauler_job_{job_id}"
    if package not in sys.modules:
        namespace = types.ModuleType(package)
        namespace.__path__ = [str(app_dir)]
        sys.modules[package] = namespace
    try:
        return importlib.import_module(f"{package}.{module}")
    except ImportError as error:
        raise JobError(f"job {job_id}: cannot import {module!r} from the job folder: {error}") from None
