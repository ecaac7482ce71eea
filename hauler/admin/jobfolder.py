"""A job read from its folder (`workspace/jobs/<id>/`), as the simulator writes it: the same files
a server writes, so the job record is told by its events and its model by its round files."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

from hauler.core.errors import ConfigError, JobError
from hauler.core.events import read_json_lines
from hauler.model.rounds import RoundStore

ENDINGS = {"job.finished": "finished", "job.failed": "failed", "job.aborted": "aborted"}


class JobFolder:
    def __init__(self, folder: Path) -> None:
        if not (folder / "events.jsonl").exists():
            raise JobError(
                f"{folder}: no job there (no events.jsonl); `hauler jobs list` shows the jobs"
            )
        self.folder = folder
        self.id = folder.name

    def events(self) -> list[dict[str, Any]]:
        return read_json_lines(self.folder / "events.jsonl")

    def metrics(self) -> list[dict[str, Any]]:
        return read_json_lines(self.folder / "metrics.jsonl")

    def logs(self) -> list[dict[str, Any]]:
        return read_json_lines(self.folder / "logs.jsonl")

    def record(self) -> dict[str, Any]:
        """The job's record, as a server's `status` gives it, from its events and files."""
        events = self.events()
        started = next((e for e in events if e["event"] == "job.started"), {})
        ended = next((e for e in reversed(events) if e["event"] in ENDINGS), None)
        return {
            "id": self.id,
            "name": started.get("name", ""),
            "num_rounds": self._num_rounds(events),
            "status": ENDINGS[ended["event"]] if ended else "running",
            "rounds_done": RoundStore(self.folder, 2).latest() or 0,
            "started_s": started.get("time_s"),
            "finished_s": ended["time_s"] if ended else None,
            "error": ended.get("error", "") if ended else "",
            "submitter": "simulator",
        }

    def _num_rounds(self, events: list[dict[str, Any]]) -> int:
        """The rounds its workflow planned once it knew its sites (cyclic), else job.toml's."""
        planned = [event["rounds"] for event in events if event["event"] == "rounds.planned"]
        if planned:
            return int(planned[-1])
        try:
            job = tomllib.loads((self.folder / "app" / "job.toml").read_text())
            return int(job.get("workflow", {}).get("num_rounds", 1))
        except (OSError, ValueError, tomllib.TOMLDecodeError):
            return 0

    def download(self, out_dir: Path) -> tuple[Path, int]:
        """Copy the newest complete round's model to `out_dir/global.safetensors`."""
        rounds = RoundStore(self.folder, 2)
        latest = rounds.latest()
        if latest is None:
            raise ConfigError(f"job {self.id} has no global model yet")
        out_dir.mkdir(parents=True, exist_ok=True)
        partial, final = out_dir / ".global.safetensors.partial", out_dir / "global.safetensors"
        shutil.copyfile(rounds.path(latest), partial)
        partial.replace(final)
        return final, latest

    def delete(self) -> None:
        if self.record()["status"] == "running":
            raise JobError(f"job {self.id} is running; it cannot be deleted")
        shutil.rmtree(self.folder)


def job_folders(workspace: Path) -> list[JobFolder]:
    """Every job of a folder of jobs, oldest first."""
    jobs = [
        JobFolder(path)
        for path in (workspace / "jobs").glob("*")
        if (path / "events.jsonl").exists()
    ]
    return sorted(jobs, key=lambda job: job.record()["started_s"] or 0.0)
