"""The server's job store: one SQLite table, the embedded default; files live beside it."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from hauler.core.errors import JobError


class JobStatus(StrEnum):
    SUBMITTED = "submitted"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def ended(self) -> bool:
        return self in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.ABORTED)


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    status: JobStatus
    submitted_s: float
    started_s: float | None
    finished_s: float | None
    rounds_done: int
    num_rounds: int
    submitter: str
    submitter_org: str
    error: str
    error_private: bool = False  # the error came from the job's own code
    note: str = ""  # what a running job waits for, e.g. which sites

    def to_json(self, *, private: bool = True) -> dict:
        """The record as JSON; `private=False` hides an error that came from the job's code."""
        record = {**asdict(self), "status": self.status.value}
        if self.error_private and not private:
            record["error"] = PRIVATE_ERROR
        return record


PRIVATE_ERROR = (
    "the job's own code failed; its message is shown to the job's submitter and project admins"
)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL,
    submitted_s REAL NOT NULL, started_s REAL, finished_s REAL,
    rounds_done INTEGER NOT NULL DEFAULT 0, num_rounds INTEGER NOT NULL,
    submitter TEXT NOT NULL DEFAULT '', submitter_org TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '', error_private INTEGER NOT NULL DEFAULT 0,
    note TEXT NOT NULL DEFAULT ''
)
"""
_ADDED_COLUMNS = {
    "error_private": "INTEGER NOT NULL DEFAULT 0",  # stores made by earlier versions
    "note": "TEXT NOT NULL DEFAULT ''",
}
_FIELDS = set(JobRecord.__dataclass_fields__)


class JobStore:
    """Jobs and their status, durable across server restarts."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, declaration in _ADDED_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")

    def add(self, job_id: str, name: str, num_rounds: int, submitter: tuple[str, str]) -> JobRecord:
        """Record a new job; `submitter` is (name, organisation)."""
        self._db.execute(
            "INSERT INTO jobs (id, name, status, submitted_s, num_rounds, submitter, submitter_org)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job_id, name, JobStatus.SUBMITTED.value, time.time(), num_rounds, *submitter),
        )
        return self.get(job_id)

    def update(self, job_id: str, **fields: object) -> JobRecord:
        unknown = set(fields) - _FIELDS
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        assignments = ", ".join(f"{key} = ?" for key in fields)
        values = [
            value.value if isinstance(value, JobStatus) else value for value in fields.values()
        ]
        self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job_id))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        row = self._db.execute(
            f"SELECT {', '.join(JobRecord.__dataclass_fields__)} FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        if row is None:
            raise JobError(f"no job {job_id!r}; `hauler jobs list` shows the jobs there are")
        return _record(row)

    def list(self) -> list[JobRecord]:
        rows = self._db.execute(
            f"SELECT {', '.join(JobRecord.__dataclass_fields__)} FROM jobs ORDER BY submitted_s"
        )
        return [_record(row) for row in rows]

    def remove(self, job_id: str) -> None:
        self.get(job_id)
        self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def close(self) -> None:
        self._db.close()


def _record(row: tuple) -> JobRecord:
    values = dict(zip(JobRecord.__dataclass_fields__, row))
    values["status"] = JobStatus(values["status"])
    values["error_private"] = bool(values["error_private"])
    return JobRecord(**values)
