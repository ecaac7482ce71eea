"""The Python API: drive a federation or a simulation from a script. The CLI is built on it.

    import hauler

    with hauler.connect(workspace="poc") as session:      # or kit="kits/alice@example.org"
        job = session.submit("examples/hello-numpy")
        job.wait(progress=True)
        job.download("out")

    job = hauler.simulate("examples/hello-numpy", sites=16)   # the same kind of job, local
    job.report("report")

Calls block until done; errors are Hauler's own (`hauler.core.errors`). A session's connection
and transfers live in an event loop of its own (`admin/portal.py`), so this works in a notebook
too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from hauler.admin.client import Admin
from hauler.admin.jobfolder import JobFolder, job_folders
from hauler.admin.poc import admin_config
from hauler.admin.portal import Portal
from hauler.admin.progress import JobDisplay, transfer_display
from hauler.admin.report import Report, build_report, write_figures
from hauler.core.config import AdminConfig, load_toml
from hauler.core.errors import ConfigError, JobError
from hauler.core.events import untracked
from hauler.simulator import SimulationPlan
from hauler.simulator import simulate as run_simulation

ENDED = {"finished", "failed", "aborted"}


@dataclass(frozen=True)
class JobReport:
    """What `job.report(dir)` made: the arranged figures and tables, and the files written."""

    report: Report
    paths: list[Path]


def connect(
    *,
    workspace: str | Path | None = None,
    kit: str | Path | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Session | LocalSession:
    """A session with the server an admin's kit (its folder or admin.toml) or a POC workspace
    names; or, for a workspace the simulator wrote, with its jobs on disk."""
    if kit is not None:
        kit = Path(kit)
        return Session(
            load_toml(AdminConfig, kit / "admin.toml" if kit.is_dir() else kit), on_wait=on_wait
        )
    if workspace is None:
        raise ConfigError(
            "say where the server is: workspace=DIR (a POC or a simulation) or kit=DIR"
        )
    workspace = Path(workspace)
    if (workspace / "server" / "server.toml").exists():
        return Session(admin_config(workspace), on_wait=on_wait)
    if (workspace / "jobs").is_dir():
        return LocalSession(workspace)
    raise ConfigError(
        f"{workspace}: neither a POC workspace (`hauler poc prepare`) nor a simulation's "
        "(`hauler simulate`)"
    )


class Session:
    """An admin's session with a server: use as a context manager, or close() it."""

    def __init__(
        self, config: AdminConfig, *, on_wait: Callable[[str], None] | None = None
    ) -> None:
        self.config = config
        self._portal = Portal()
        try:
            self._admin = self._portal.call(
                _opened(Admin, config, on_wait)
            )  # gRPC binds to its loop
        except BaseException:
            self._portal.close()
            raise

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._portal.call(self._admin.__aexit__(None, None, None))
        finally:
            self._portal.close()

    def call(self, coroutine: Any) -> Any:
        """Run one of the session's Admin coroutines (for the API's own objects)."""
        return self._portal.call(coroutine)

    def iterate(self, items: Any) -> Iterator[Any]:
        return self._portal.iterate(items)

    @property
    def admin(self) -> Admin:
        return self._admin

    def submit(
        self,
        job_dir: str | Path,
        *,
        initial_model: str | Path | None = None,
        progress: bool = False,
    ) -> Job:
        """Submit a job folder with its initial model (built here, unless given or the job names
        one of the server's); `progress` shows the upload as a bar on a terminal."""
        model = Path(initial_model) if initial_model is not None else None
        if progress:
            with transfer_display(Console(stderr=True)) as track:
                return Job(
                    self,
                    self.call(self._admin.submit(Path(job_dir), initial_model=model, track=track)),
                )
        return Job(
            self, self.call(self._admin.submit(Path(job_dir), initial_model=model, track=untracked))
        )

    def jobs(self) -> list[dict[str, Any]]:
        """Every job's record, oldest first."""
        return self.call(self._admin.list_jobs())

    def job(self, job_id: str) -> Job:
        job = Job(self, job_id)
        job.record()  # an unknown id is an error now, not at the first use
        return job

    def sites(self) -> list[dict[str, Any]]:
        """The sites connected now: name, organisation, since when, last heartbeat, task."""
        return self.call(self._admin.sites())


class Job:
    """A job on a server."""

    def __init__(self, session: Session, job_id: str) -> None:
        self.session, self.id = session, job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def record(self) -> dict[str, Any]:
        """The job's record: name, status, rounds done, error."""
        return self.status()["job"]

    def status(self) -> dict[str, Any]:
        """The record and its round and site metrics (without resource samples)."""
        return self.session.call(self.session.admin.status(self.id))

    def events(self, *, follow: bool = False) -> Iterator[dict[str, Any]]:
        """The job's events so far; with `follow`, then live ones until it ends."""
        if follow:
            return self.session.iterate(self.session.admin.watch(self.id))
        return iter(self.session.call(self.session.admin.events(self.id)))

    def metrics(self) -> list[dict[str, Any]]:
        return self.session.call(self.session.admin.metrics(self.id))

    def logs(self) -> list[dict[str, Any]]:
        """The job's log lines: the server's, and its sites' if this admin may read them."""
        return self.session.call(self.session.admin.logs(self.id))

    def wait(self, *, progress: bool = False, console: Console | None = None) -> dict[str, Any]:
        """Until the job ends: its final record. Raises JobError if it did not finish."""
        if progress:
            with JobDisplay(console or Console()) as display:
                for event in self.events(follow=True):
                    display.show(event)
        else:
            for _ in self.events(follow=True):
                pass
        return _finished(self.record())

    def download(self, out_dir: str | Path) -> Path:
        """The newest global model as `out_dir/global.safetensors`."""
        return self.session.call(self.session.admin.download(self.id, Path(out_dir)))[0]

    def report(self, out_dir: str | Path, *, tensorboard: bool = False) -> JobReport:
        return make_report(self.record(), self.metrics(), Path(out_dir), tensorboard=tensorboard)

    def abort(self) -> None:
        self.session.call(self.session.admin.abort(self.id))

    def delete(self) -> None:
        """Remove the ended job from the server and its sites."""
        self.session.call(self.session.admin.delete(self.id))


class LocalSession:
    """The jobs of a workspace the simulator wrote, read from disk."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def submit(self, job_dir: str | Path, **options: Any) -> LocalJob:
        raise ConfigError(
            f"{self.workspace} is a simulation's workspace: run jobs there with "
            "`hauler simulate JOB --workspace` (or hauler.simulate)"
        )

    def jobs(self) -> list[dict[str, Any]]:
        return [folder.record() for folder in job_folders(self.workspace)]

    def job(self, job_id: str) -> LocalJob:
        return LocalJob(JobFolder(self.workspace / "jobs" / job_id))

    def sites(self) -> list[dict[str, Any]]:
        return []


class LocalJob:
    """A simulated job (or any job folder), with the methods of a server's `Job`."""

    def __init__(self, folder: JobFolder) -> None:
        self.folder, self.id = folder, folder.id

    def __repr__(self) -> str:
        return f"LocalJob({self.id!r})"

    def record(self) -> dict[str, Any]:
        return self.folder.record()

    def status(self) -> dict[str, Any]:
        metrics = [r for r in self.folder.metrics() if r.get("kind") != "resources"]
        return {"job": self.record(), "metrics": metrics}

    def events(self, *, follow: bool = False) -> Iterator[dict[str, Any]]:
        return iter(self.folder.events())  # a simulation has ended by the time anyone asks

    def metrics(self) -> list[dict[str, Any]]:
        return self.folder.metrics()

    def logs(self) -> list[dict[str, Any]]:
        return self.folder.logs()

    def wait(self, *, progress: bool = False, console: Console | None = None) -> dict[str, Any]:
        return _finished(self.record())

    def download(self, out_dir: str | Path) -> Path:
        return self.folder.download(Path(out_dir))[0]

    def report(self, out_dir: str | Path, *, tensorboard: bool = False) -> JobReport:
        return make_report(self.record(), self.metrics(), Path(out_dir), tensorboard=tensorboard)

    def abort(self) -> None:
        raise JobError(f"job {self.id} already {self.record()['status']}")

    def delete(self) -> None:
        self.folder.delete()


def simulate(
    job_dir: str | Path,
    *,
    sites: int,
    workers: int | None = None,
    workspace: str | Path = "sim",
    settings: str | Path | dict[str, dict[str, Any]] | None = None,
    initial_model: str | Path | None = None,
    ray: str | None = None,
    worker_cpus: float = 1.0,
    worker_gpus: float = 0.0,
    progress: bool = False,
    console: Console | None = None,
) -> LocalJob:
    """Run a job on `sites` virtual sites, `workers` (default: the cores) training at once, and
    return it once ended; `ray` is a Ray cluster's address (or "auto") to run the workers on."""
    plan = SimulationPlan(
        Path(job_dir),
        sites,
        Path(workspace),
        workers=workers,
        settings=Path(settings) if isinstance(settings, str | Path) else settings,
        initial_model=Path(initial_model) if initial_model is not None else None,
        ray=ray,
        worker_cpus=worker_cpus,
        worker_gpus=worker_gpus,
    )
    portal = Portal()
    try:
        with JobDisplay(console or Console()) if progress else contextlib.nullcontext() as display:
            on_event = (lambda event: display.show(event.to_record())) if display else None
            job_id = portal.call(run_simulation(plan, on_event=on_event))
    finally:
        portal.close()
    return LocalJob(JobFolder(plan.workspace.resolve() / "jobs" / job_id))


def make_report(
    record: dict[str, Any], metrics: list[dict[str, Any]], out_dir: Path, *, tensorboard: bool
) -> JobReport:
    """A job's figures as PNGs in `out_dir` (and TensorBoard runs in out_dir/tensorboard)."""
    report = build_report(record, metrics)
    paths = write_figures(report, out_dir)
    if tensorboard:
        from hauler.admin.tensorboard import write_tensorboard  # tensorboardX only when asked

        paths += write_tensorboard(report, out_dir / "tensorboard")
    return JobReport(report, paths)


async def _opened(
    kind: type[Admin], config: AdminConfig, on_wait: Callable[[str], None] | None
) -> Admin:
    """An Admin made and connected in the running loop, which its channel then belongs to."""
    admin = kind(config, on_wait=on_wait)
    return await admin.__aenter__()


def _finished(record: dict[str, Any]) -> dict[str, Any]:
    if record["status"] != "finished":
        raise JobError(
            f"job {record['id']} {record['status']}: {record.get('error') or 'no reason given'}"
        )
    return record
