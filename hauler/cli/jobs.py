"""`hauler submit` and `hauler jobs ...`: a federation's (or a simulation's) jobs, as an admin."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from hauler.admin.matrix import matrix_tables
from hauler.admin.progress import JobDisplay, describe
from hauler.admin.report import metrics_table, process_table, round_table, transfer_table
from hauler.cli.common import (
    AdminConfigOption,
    WorkspaceOption,
    console,
    errors,
    fail,
    failing_plainly,
    session,
    where,
)
from hauler.core.errors import HaulerError, JobError
from hauler.core.package import code_digest, load_job

app = typer.Typer(
    help="List, inspect, follow, report on, abort, delete and download jobs.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
JobId = Annotated[str, typer.Argument(help="The job's id, as `hauler jobs list` shows it.")]
JobDir = Annotated[
    Path, typer.Argument(help="Job folder with a job.toml.", exists=True, file_okay=False)
]


def submit(
    job_dir: JobDir,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job; exit non-zero if it fails.")
    ] = False,
    initial_model: Annotated[
        Path | None,
        typer.Option(
            "--initial-model",
            help="A safetensors file to start from (e.g. a pretrained checkpoint), "
            "uploaded with the job; by default round 0 is built here by the job's model module.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    workspace: WorkspaceOption = None,
    admin_config: AdminConfigOption = None,
) -> None:
    """Submit a job folder to the server, with its initial model."""
    with failing_plainly():
        load_job(job_dir)  # a broken job.toml is reported before anything is dialled
    with session(workspace, admin_config) as opened:
        job = opened.submit(job_dir, initial_model=initial_model, progress=True)
        console.print(f"submitted job {job.id}")
        if wait:
            _follow(job, where(workspace, admin_config))


def _follow(job: Any, options: str) -> None:
    """Show the job's progress until it ends; Ctrl-C leaves it running and says how to go on."""
    try:
        with JobDisplay(console) as display:
            for event in job.events(follow=True):
                display.show(event)
    except KeyboardInterrupt:
        errors.print(
            f"stopped following; job {job.id} keeps running. Follow it again with "
            f"`hauler jobs follow {job.id} {options}`, or stop it with "
            f"`hauler jobs abort {job.id} {options}`.",
            highlight=False,
        )
        raise typer.Exit(130) from None
    record = job.record()
    if record["status"] != "finished":
        errors.print(f"job ended with job.{record['status']}", highlight=False)
        raise typer.Exit(1)


@app.command("list")
def list_jobs(workspace: WorkspaceOption = None, admin_config: AdminConfigOption = None) -> None:
    """Every job the server knows, oldest first."""
    with session(workspace, admin_config) as opened:
        jobs = opened.jobs()
    table = Table("id", "name", "status", "rounds", "error")
    for job in jobs:
        table.add_row(
            job["id"],
            job["name"],
            job["status"],
            f"{job['rounds_done']}/{job['num_rounds']}",
            job["error"][:60],
        )
    console.print(table)


@app.command()
def status(
    job_id: JobId, workspace: WorkspaceOption = None, admin_config: AdminConfigOption = None
) -> None:
    """A job's status, what it waits for, and its per-round timings."""
    with session(workspace, admin_config) as opened:
        reply = opened.job(job_id).status()
    job = reply["job"]
    console.print(
        f"job {job['id']} ({job['name']}): {job['status']}, "
        f"rounds {job['rounds_done']}/{job['num_rounds']}",
        highlight=False,
    )
    for key in ("note", "error"):
        if job.get(key):
            console.print(f"{key}: {job[key]}", highlight=False)
    table = Table("round", "download s", "train s", "upload s", "aggregate s", "round s")
    for row in reply["metrics"]:
        if row.get("kind") == "round":
            table.add_row(
                str(row["round"]),
                *(
                    f"{row.get(k, 0.0):.2f}"
                    for k in ("download_s", "train_s", "upload_s", "aggregate_s", "round_s")
                ),
            )
    console.print(table)
    sites = sorted(
        (row for row in reply["metrics"] if row.get("kind") == "site"),
        key=lambda row: (row["round"], row["site"]),
    )
    if sites:
        console.print(transfer_table(sites))


@app.command()
def events(
    job_id: JobId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Then wait for new ones until the job ends.")
    ] = False,
    workspace: WorkspaceOption = None,
    admin_config: AdminConfigOption = None,
) -> None:
    """A job's events, one line each (every site's failures and results, rounds, its end)."""
    with session(workspace, admin_config) as opened:
        for event in opened.job(job_id).events(follow=follow):
            if event["event"] != "transfer.progress":
                stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time_s", 0)))
                console.print(f"{stamp} {describe(event)}", highlight=False, soft_wrap=True)


@app.command("follow")
def follow_job(
    job_id: JobId, workspace: WorkspaceOption = None, admin_config: AdminConfigOption = None
) -> None:
    """Show a job's progress until it ends (again, after Ctrl-C left `submit --wait`)."""
    with session(workspace, admin_config) as opened:
        _follow(opened.job(job_id), where(workspace, admin_config))


@app.command()
def report(
    job_id: JobId,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the figures into.")],
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard",
            help="Also write TensorBoard event files "
            "to OUT/tensorboard/<process>/ (needs hauler[tensorboard]).",
        ),
    ] = False,
    workspace: WorkspaceOption = None,
    admin_config: AdminConfigOption = None,
) -> None:
    """Figures of a job (CPU, memory, timeline, training metrics) and a summary of its rounds."""
    with session(workspace, admin_config) as opened:
        made = opened.job(job_id).report(out, tensorboard=tensorboard)
    show_summary(made.report)
    for path in made.paths:
        console.print(f"wrote {path}", highlight=False)


def show_summary(report: Any) -> None:
    """The tables a job's report prints: rounds, training metrics, a cross-site evaluation's
    matrix, processes."""
    tables = (
        round_table(report),
        transfer_table(report.sites),
        metrics_table(report),
        *(matrix_tables(report.matrix) if report.matrix is not None else ()),
        process_table(report),
    )
    for table in tables:
        if table is not None:
            console.print(table)


@app.command()
def abort(
    job_id: JobId, workspace: WorkspaceOption = None, admin_config: AdminConfigOption = None
) -> None:
    """Stop a job; its completed rounds stay on the server."""
    with session(workspace, admin_config) as opened:
        opened.job(job_id).abort()
    console.print(f"aborted job {job_id}")


@app.command()
def delete(
    job_id: Annotated[
        str | None, typer.Argument(help="The job to delete; or give --older-than.")
    ] = None,
    older_than: Annotated[
        float | None,
        typer.Option(
            "--older-than", help="Delete every ended job that ended more than this many days ago."
        ),
    ] = None,
    workspace: WorkspaceOption = None,
    admin_config: AdminConfigOption = None,
) -> None:
    """Remove ended jobs: their files on the server (or simulation) and on the sites."""
    if (job_id is None) == (older_than is None):
        fail(JobError("give a job id or --older-than DAYS (one of them)"))
    with session(workspace, admin_config) as opened:
        chosen = [job_id] if job_id is not None else _ended_before(opened.jobs(), older_than or 0.0)
        for each in chosen:
            opened.job(each).delete()
            console.print(f"deleted job {each}")
    if not chosen:
        console.print(f"no job ended more than {older_than:g} days ago")


def _ended_before(jobs: list[dict[str, Any]], days: float) -> list[str]:
    cutoff = time.time() - days * 86400
    return [job["id"] for job in jobs if job.get("finished_s") and job["finished_s"] < cutoff]


@app.command()
def download(
    job_id: JobId,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder to write global.safetensors into.")
    ],
    workspace: WorkspaceOption = None,
    admin_config: AdminConfigOption = None,
) -> None:
    """Download a job's latest global model as safetensors."""
    with session(workspace, admin_config) as opened:
        job = opened.job(job_id)
        path = job.download(out)
        rounds = job.record()["rounds_done"]
    console.print(f"wrote {path} (the global model after {rounds} rounds)", highlight=False)


@app.command()
def digest(job_dir: JobDir) -> None:
    """Print the digest of a job's code (every file but job.toml), for a site's trusted_code."""
    try:
        load_job(job_dir)
        value = code_digest(job_dir)
    except HaulerError as error:
        fail(error)
    console.print(value, highlight=False)
    errors.print(
        f"a site with allow_custom_code = false runs this job once its site.toml has\n"
        f'  trusted_code = ["{value}"]',
        highlight=False,
    )


@app.command()
def logs(
    job_id: JobId,
    site: Annotated[
        str | None, typer.Option("--site", help="Only this process's lines (a site, or server).")
    ] = None,
    workspace: WorkspaceOption = None,
    admin_config: AdminConfigOption = None,
) -> None:
    """A job's log lines: the server's, and those of the sites that took part (their records
    about the job and its training code's output; shown to its submitter and project admins)."""
    with session(workspace, admin_config) as opened:
        lines = opened.job(job_id).logs()
    for entry in lines:
        if site is None or entry.get("process") == site:
            stamp = time.strftime("%H:%M:%S", time.localtime(entry.get("t", 0)))
            console.print(
                f"{stamp} {entry.get('process', '?')} {entry.get('level', '')} "
                f"{entry.get('message', '')}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
