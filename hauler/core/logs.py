"""Logging: quiet on the console, complete in a file, and a job's lines kept for its admins.

- stderr: readable lines (`14:02:11 warning hauler.client task failed job=... error=...`),
  WARNING and above unless `-v`;
- a role's log file (`workspace/logs/<role>.log`): every INFO record as one JSON object a line,
  rotated (LOG_FILE_BYTES x LOG_FILES);
- records that name a `job` are also kept for that job (`JobLogs`): a site sends them to the
  server with its heartbeats, the server writes them into the job's folder, and
  `hauler jobs logs` shows them.
"""

from __future__ import annotations

import collections
import json
import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Any

ROOT = "hauler"
LOG_FILE_BYTES = 10 << 20
LOG_FILES = 5
MAX_MESSAGE_CHARS = 2000  # a log line sent elsewhere is cut here
MAX_KEPT_LINES = 1000  # job lines kept for sending; older ones are dropped (and counted)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record's own fields (what callers passed as `extra`)."""
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, fields, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time_s": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **fields_of(record),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ReadableFormatter(logging.Formatter):
    """`14:02:11 warning hauler.client task failed job=ab12 error=...`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        details = " ".join(f"{key}={value}" for key, value in fields_of(record).items())
        level = record.levelname.lower()
        line = f"{stamp} {level} {record.name} {record.getMessage()} {details}".rstrip()
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


class JobLogs(logging.Handler):
    """Keeps the records that name a job, as small dicts, until taken (bounded)."""

    def __init__(self, limit: int = MAX_KEPT_LINES) -> None:
        super().__init__(logging.INFO)
        self._lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=limit)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        job = getattr(record, "job", None)
        if not isinstance(job, str) or not job:
            return
        if len(self._lines) == self._lines.maxlen:
            self.dropped += 1
        self._lines.append(
            line(job, record.levelname.lower(), format_message(record), time_s=record.created)
        )

    def add(self, job: str, level: str, message: str) -> None:
        """A line not from a log record (a training process's output)."""
        self._lines.append(line(job, level, message))

    def take(self, most: int) -> list[dict[str, Any]]:
        return [self._lines.popleft() for _ in range(min(most, len(self._lines)))]


def line(job: str, level: str, message: str, *, time_s: float | None = None) -> dict[str, Any]:
    return {
        "t": round(time.time() if time_s is None else time_s, 3),
        "job": job,
        "level": level,
        "message": message[:MAX_MESSAGE_CHARS],
    }


def format_message(record: logging.LogRecord) -> str:
    """The record's message and fields (but `job`) on one line, and its traceback after."""
    details = " ".join(f"{k}={v}" for k, v in fields_of(record).items() if k != "job")
    text = f"{record.getMessage()} {details}".rstrip()
    if record.exc_info:
        text += "\n" + logging.Formatter().formatException(record.exc_info)
    return text


def configure(verbose: bool = False) -> None:
    """Hauler's logs on stderr as readable lines: WARNING and above, or INFO when `verbose`."""
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ReadableFormatter())
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    root = logging.getLogger(ROOT)
    root.handlers[:] = [console]
    root.setLevel(logging.INFO)


def write_to(path: Path) -> None:
    """Also every INFO record, as JSON lines, to `path` (rotated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILES
    )
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.INFO)
    logging.getLogger(ROOT).addHandler(handler)


def keep_job_lines(handler: logging.Handler) -> None:
    logging.getLogger(ROOT).addHandler(handler)
