"""A job's log lines, `jobs/<id>/logs.jsonl`: the server's records that name the job, and the
lines its sites send with their heartbeats (their records about the job and its training code's
output). A site's lines count only for jobs it takes part in, and at most MAX_SITE_LINES per
site and job, so no site can fill a job's folder; the rest are counted, not kept."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hauler.core.logs import format_message, line
from hauler.core.messages import LogLine

SERVER = "server"
MAX_SITE_LINES = 20_000
LOGS_FILE = "logs.jsonl"


class JobLogRecorder(logging.Handler):
    """A logging handler for the server's own records, and the sink of its sites' lines."""

    def __init__(self, jobs_dir: Path, takes_part: Callable[[str, str], bool]) -> None:
        super().__init__(logging.INFO)
        self.jobs_dir, self.takes_part = jobs_dir, takes_part
        self._counts: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.refused = 0

    def emit(self, record: logging.LogRecord) -> None:
        job = getattr(record, "job", None)
        if isinstance(job, str) and (self.jobs_dir / job).is_dir():
            entry = line(
                job, record.levelname.lower(), format_message(record), time_s=record.created
            )
            self._write(job, [{**entry, "process": SERVER}])

    def record(self, site: str, lines: list[LogLine]) -> None:
        """A site's lines, each kept if the site takes part in its job and has room there."""
        by_job: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        for each in lines:
            key = (each.job, site)
            if self._counts[key] >= MAX_SITE_LINES or not self.takes_part(each.job, site):
                self.refused += 1
                continue
            self._counts[key] += 1
            by_job[each.job].append({**each.model_dump(), "process": site, "private": True})
        for job, entries in by_job.items():
            self._write(job, entries)

    def _write(self, job: str, entries: list[dict[str, Any]]) -> None:
        with open(self.jobs_dir / job / LOGS_FILE, "a", encoding="utf-8") as file:
            file.writelines(json.dumps(entry) + "\n" for entry in entries)
