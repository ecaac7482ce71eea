"""Job packages: a job folder zipped for the control plane, and unpacked as hostile input.

Unpacking checks every entry's name and kind before writing a byte, streams the entries
into a fresh folder beside the target while counting the bytes really written, and moves
that folder into place only once its job.toml is valid; any failure is a JobError naming
the entry at fault, and leaves the target as it was. `code_digest` names the code a job
runs, for sites that run only vetted code.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import io
import os
import shutil
import stat
import struct
import sys
import tempfile
import tomllib
import types
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from hauler.core.config import JobConfig, load_toml, parse
from hauler.core.errors import ConfigError, JobError

JOB_FILE = "job.toml"
SKIPPED = {"__pycache__", ".git", ".venv"}
# A job is code and a few small files. Every entry costs a file (and an inode) on the server
# and on every site, so a package holding more is a data set or an attack, not a job.
MAX_ENTRIES = 10_000
EXPANSION = 4  # a package may unpack to at most EXPANSION times its own size limit
MAX_DEPTH = 32  # folders within folders: no code tree nests this deep
MAX_PART_BYTES = 255  # one name in a path: the limit of common file systems
MAX_PATH_BYTES = 1024  # a whole path: far within PATH_MAX, even under a deep jobs folder
LOCAL_HEADER_BYTES = 30  # an entry's local header, before its name, extra field and data
BLOCK = 1 << 20  # entries are streamed to disk in blocks this big
FILE_MODE, EXEC_MODE, FOLDER_MODE = 0o644, 0o755, 0o755  # only the owner's exec bit is kept
ACCEPTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}  # what pack writes; no more code
# What zipfile, zlib and the OS raise on a hostile archive (UnicodeDecodeError is a ValueError,
# encrypted entries raise RuntimeError, unknown methods NotImplementedError).
READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    EOFError,
    OSError,
    ValueError,
    OverflowError,
    NotImplementedError,
    RuntimeError,
)

JOB_PATH = PurePosixPath(JOB_FILE)
Layout = tuple[list[PurePosixPath], list[tuple[zipfile.ZipInfo, PurePosixPath]]]


def load_job(job_dir: Path) -> JobConfig:
    """Read and validate a job folder's job.toml."""
    path = Path(job_dir) / JOB_FILE
    if not path.exists():
        raise ConfigError(
            f"{job_dir}: no {JOB_FILE}; a job is a folder with a job.toml and its code"
        )
    return load_toml(JobConfig, path)


def job_files(job_dir: Path) -> list[tuple[str, Path]]:
    """A job's packed files, sorted (POSIX path, path): one list so pack and code_digest agree."""
    job_dir = Path(job_dir)
    files = []
    for path in job_dir.rglob("*"):
        relative = path.relative_to(job_dir)
        if not SKIPPED.intersection(relative.parts) and path.is_file():
            files.append((relative.as_posix(), path))
    return sorted(files)


def pack(job_dir: Path, max_bytes: int) -> str:
    """Zip a job folder (validated first) and return it base64-encoded."""
    job_dir = Path(job_dir)
    load_job(job_dir)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for relative, path in job_files(job_dir):
            archive.write(path, relative)
            if buffer.tell() > max_bytes:
                raise ConfigError(
                    f"{job_dir}: job package exceeds {max_bytes >> 20} MiB; keep data out of it"
                )
    return base64.b64encode(buffer.getvalue()).decode()


def code_digest(job_dir: Path) -> str:
    """`sha256:<hex>` of every packed file but job.toml: the vetted code, whatever its settings."""
    listing = hashlib.sha256()
    for relative, path in job_files(job_dir):
        if relative != JOB_FILE:
            with path.open("rb") as file:
                content = hashlib.file_digest(file, "sha256").hexdigest()
            listing.update(f"{relative}\0{content}\n".encode())
    return f"sha256:{listing.hexdigest()}"


def unpack(package_b64: str, target: Path, max_bytes: int) -> JobConfig:
    """Check a job package, extract it beside `target`, parse its job.toml, then move it in.

    Blocking file work that never touches asyncio: callers run it in a worker thread
    (asyncio.to_thread). On any failure nothing written stays and `target` is as it was."""
    target = Path(target)
    with _open_archive(package_b64, max_bytes) as archive:
        layout = _layout(archive.infolist())
        _check_extents(archive)
        return _unpack_beside(archive, layout, target, EXPANSION * max_bytes)


def _unpack_beside(archive: zipfile.ZipFile, layout: Layout, target: Path, limit: int) -> JobConfig:
    """Unpack into a new folder beside `target`, removing the folders made for it on failure."""
    missing = [path for path in (target.parent, *target.parent.parents) if not path.exists()]
    try:
        with _as_job_error(f"cannot make a folder beside {target} to unpack into"):
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".unpacking", dir=target.parent)
            )
        return _unpack_into(archive, layout, staging, target, limit)
    except BaseException:
        _remove_empty(missing)
        raise


def _unpack_into(
    archive: zipfile.ZipFile, layout: Layout, staging: Path, target: Path, limit: int
) -> JobConfig:
    """Extract into `staging`, parse its job.toml, then move it to `target`; or remove it."""
    try:
        _extract(archive, *layout, staging, limit)
        job = parse(JobConfig, _read_toml(staging / JOB_FILE), JOB_FILE)
        with _as_job_error(f"cannot move the unpacked job package to {target}"):
            _replace(target, staging)
    except BaseException:
        _remove(staging)
        raise
    return job


def _open_archive(package_b64: str, max_bytes: int) -> zipfile.ZipFile:
    """The package as a zip archive, unless it is not one or is over `max_bytes`."""
    with _as_job_error("job package is not a base64 zip archive"):
        data = base64.b64decode(package_b64, validate=True)
    if len(data) > max_bytes:
        raise JobError(f"job package of {len(data)} bytes exceeds {max_bytes}")
    with _as_job_error("job package is not a base64 zip archive"):
        return zipfile.ZipFile(io.BytesIO(data))


def _layout(entries: list[zipfile.ZipInfo]) -> Layout:
    """The folders to make (parents first) and files to write; refuse unsafe or clashing ones."""
    if len(entries) > MAX_ENTRIES:
        raise JobError(
            f"job package has {len(entries)} entries, more than the {MAX_ENTRIES} a job may hold"
        )
    seen: set[PurePosixPath] = set()
    folders: set[PurePosixPath] = set()
    files = []
    for entry in entries:
        path = _checked_path(entry)
        if path in seen:
            raise JobError(f"job package entry {entry.filename!r} appears twice")
        seen.add(path)
        folders.update(path.parents[:-1])
        if entry.is_dir():
            folders.add(path)
        else:
            files.append((entry, path))
    for entry, path in files:
        if path in folders:
            raise JobError(f"job package entry {entry.filename!r} is both a file and a folder")
    if JOB_PATH not in seen or JOB_PATH in folders:
        raise JobError(f"job package has no {JOB_FILE}")
    return sorted(folders), files


def _check_extents(archive: zipfile.ZipFile) -> None:
    """Refuse entries whose declared data runs into the next one: lying sizes, or shared data."""
    entries = sorted(archive.infolist(), key=lambda entry: entry.header_offset)
    ends = [entry.header_offset for entry in entries[1:]] + [archive.start_dir]
    for entry, end in zip(entries, ends):
        name = entry.orig_filename.encode("utf-8" if entry.flag_bits & 0x800 else "cp437")
        if entry.header_offset + LOCAL_HEADER_BYTES + len(name) + entry.compress_size > end:
            raise JobError(
                f"job package entry {entry.filename!r} declares {entry.compress_size} "
                "bytes of data, more than lie before the next entry"
            )


def _checked_path(entry: zipfile.ZipInfo) -> PurePosixPath:
    """The entry's path within the job folder, or a JobError saying why it is unsafe."""
    path = PurePosixPath(entry.filename)
    fault = _name_fault(entry.filename, path) or _kind_fault(entry)
    if fault:
        raise JobError(f"job package entry {entry.filename!r} {fault}")
    return path


def _name_fault(name: str, path: PurePosixPath) -> str | None:
    """What makes an entry's name unsafe to write under the job folder, if anything."""
    if not path.parts or path.parts == (".",):
        return "has no name"
    if path.is_absolute() or name.startswith(("/", "\\")) or ":" in path.parts[0]:
        return "is an absolute path"
    if ".." in path.parts or "\\" in name:
        return "escapes the job folder"
    if len(path.parts) > MAX_DEPTH:
        return f"is nested deeper than {MAX_DEPTH} folders"
    longest = max(len(part.encode()) for part in path.parts)
    if len(name.encode()) > MAX_PATH_BYTES or longest > MAX_PART_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes, or has a name longer than {MAX_PART_BYTES}"
    return None


def _kind_fault(entry: zipfile.ZipInfo) -> str | None:
    """What makes an entry other than a plain file or folder we can read, if anything."""
    kind = stat.S_IFMT(entry.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "is a link"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "is a device, FIFO or socket"
    if entry.flag_bits & 0x1:
        return "is encrypted"
    if entry.compress_type not in ACCEPTED_METHODS:
        return f"uses compression method {entry.compress_type}; only stored and deflated are"
    return None


def _extract(
    archive: zipfile.ZipFile,
    folders: list[PurePosixPath],
    files: list[tuple[zipfile.ZipInfo, PurePosixPath]],
    staging: Path,
    limit: int,
) -> None:
    """Create the folders, then stream each file into place, counting the bytes really written."""
    for folder in folders:
        path = staging.joinpath(*folder.parts)
        with _as_job_error(f"job package folder {folder.as_posix()!r} cannot be created"):
            os.mkdir(path)
            os.chmod(path, FOLDER_MODE)
    written = 0
    for entry, path in files:
        with _as_job_error(f"job package entry {entry.filename!r} cannot be unpacked"):
            written += _write_file(archive, entry, staging.joinpath(*path.parts), limit - written)


def _write_file(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, path: Path, room: int) -> int:
    """Stream an entry into a new file; refuse it past `room` bytes or off its declared size."""
    written = 0
    with archive.open(entry) as source, open(path, "xb") as sink:
        executable = entry.external_attr >> 16 & stat.S_IXUSR
        os.fchmod(sink.fileno(), EXEC_MODE if executable else FILE_MODE)
        while block := source.read(BLOCK):
            written += len(block)
            if written > room:
                raise JobError(
                    f"job package expands past {EXPANSION} times its size limit, "
                    f"at entry {entry.filename!r}"
                )
            sink.write(block)
    if written != entry.file_size:
        raise JobError(
            f"job package entry {entry.filename!r} holds {written} bytes, "
            f"not the {entry.file_size} its header declares"
        )
    return written


def _read_toml(path: Path) -> dict:
    """An unpacked job.toml as a dict, or a JobError saying why it cannot be read."""
    try:
        return tomllib.loads(path.read_bytes().decode())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise JobError(f"{JOB_FILE}: not valid TOML: {error}") from None


def _replace(target: Path, staging: Path) -> None:
    """Rename `staging` to `target`; an old target is renamed aside first and removed after."""
    os.chmod(staging, FOLDER_MODE)
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    aside = staging.with_name(staging.name + ".old")
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _remove(aside)


@contextlib.contextmanager
def _as_job_error(what: str) -> Iterator[None]:
    """Turn what zipfile, zlib and the OS raise on hostile input into a JobError about `what`."""
    try:
        yield
    except READ_ERRORS as error:
        raise JobError(f"{what}: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    """What an error from zipfile, zlib or the OS says about the archive, in words."""
    if isinstance(error, EOFError):
        return "its data ends early"
    if isinstance(error, zlib.error):
        return f"its compressed data is corrupt ({error})"
    return f"{type(error).__name__}: {error}"


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders made for unpacking, deepest first, as long as they are empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _remove(path: Path) -> None:
    """Delete a file or a folder tree, never following a link, and never failing."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


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
        raise JobError(
            f"job {job_id}: cannot import {module!r} from the job folder: {error}"
        ) from None
