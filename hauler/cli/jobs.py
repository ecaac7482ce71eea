"""`hauler submit` and `hauler jobs ...`: talk to a running federation as an admin."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hauler.admin import Admin
from hauler.cli.common import (
    AdminConfigOption,
    WorkspaceOption,
    console,
    errors,
    fail,
    resolve_admin,
    run,
)
from hauler.cli.progress import follow, transfer_display
from hauler.core.errors import HaulerError
from hauler.core.package import code_digest, load_job

app = typer.Typer(help="List, inspect, report on, abort and download jobs.", no_args_is_help=True)


def submit(
    job_dir: Annotated[Path, typer.Argument(help="Job folder with a job.toml.", exists=True, file_okay=False)],
    wait: Annotated[bool, typer.Option("--wait", help="Show progress; exit non-zero if the job fails.")] = False,
    initial_model: Annotated[Path | None, typer.Option(
        "--initial-model", help="A safetensors file to start from (e.g. a pretrained checkpoint), "
        "uploaded with the job; by default round 0 is built here by the job's model module.",
        exists=True, dir_okay=False)] = None,
    workspace: WorkspaceOption = None,
    admin_config: AdminConfigOption = None,
) -> None:
    """Submit a job folder to the server, with its initial model."""
    config = resolve_admin(workspace, admin_config)
    try:
        load_job(job_dir)  # a broken job.toml is reported before anything is dialled
    except HaulerError as error:
        fail(error)

    async def go() -> str:
        async with Admin(config) as admin:
            with transfer_display(errors) as track:
                job_id = await admin.submit(job_dir, initial_model=initial_model, track=track)
            console.print(f"submitted job {job_id}")
            if not wait:
                return "submitted"
            final = await follow(admin.watch(job_id), console)
            return final.get("event", "")

    outcome = run(go())
    if wait and outcome != "job.finished":
        errors.print(f"job ended with {outcome}")
        raise typer.Exit(1)


@app.command("list")
def list_jobs(workspace: WorkspaceOption = None, admin_config: AdminConfigOption = None) -> None:
    """Every job the server knows, oldest first."""
    config = resolve_admin(workspace, admin_config)

    async def go() -> list[dict]:
        async with Admin(config) as admin:
            return await admin.list_jobs()

    table = Table("id", "name", "status", "rounds", "error")
    for job in run(go()):
        table.add_row(job["id"], job["name"], job["status"], f"{job['rounds_done']}/{job['num_rounds']}",
                      job["error"][:60])
    console.print(table)


@app.command()
def status(job_id: str, workspace: WorkspaceOption = None, admin_config: AdminConfigOption = None) -> None:
    """A job's status and its per-round timings."""
    config = resolve_admin(workspace, admin_config)

    async def go() -> dict:
        async with Admin(config) as admin:
            return await admin.status(job_id)

    reply = run(go())
    job = reply["job"]
    console.print(f"job {job['id']} ({job['name']}): {job['status']}, rounds {job['rounds_done']}/{job['num_rounds']}")
    if job["error"]:
        console.print(f"error: {job['error']}")
    table = Table("round", "download s", "train s", "upload s", "aggregate s", "round s")
    for row in reply["metrics"]:
        if row.get("kind") == "round":
            table.add_row(str(row["round"]), *(f"{row[k]:.2f}" for k in
                                               ("download_s", "train_s", "upload_s", "aggregate_s", "round_s")))
    console.print(table)


@app.command()
def report(
    job_id: str,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the figures into.")],
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard event files "
                                              "to OUT/tensorboard/<process>/ (needs hauler[tensorboard]).")] = False,
    workspace: WorkspaceOption = None,
    admin_config: AdminConfigOption = None,
) -> None:
    """Figures of a job (CPU, memory, round timeline) and a summary of its rounds and processes."""
    from hauler.admin.report import build_report, metrics_table, process_table, round_table, write_figures

    config = resolve_admin(workspace, admin_config)

    async def go() -> tuple[dict, list[dict]]:
        async with Admin(config) as admin:
            return (await admin.status(job_id))["job"], await admin.metrics(job_id)

    job, records = run(go())
    summary = build_report(job, records)
    for table in (round_table(summary), metrics_table(summary), process_table(summary)):
        if table is not None:
            console.print(table)
    for path in write_figures(summary, out):
        console.print(f"wrote {path}")
    if tensorboard:
        from hauler.admin.tensorboard import write_tensorboard

        try:
            runs = write_tensorboard(summary, out / "tensorboard")
        except HaulerError as error:
            fail(error)
        console.print(f"wrote TensorBoard runs {', '.join(run.name for run in runs)} to {out / 'tensorboard'}")


@app.command()
def abort(job_id: str, workspace: WorkspaceOption = None, admin_config: AdminConfigOption = None) -> None:
    """Stop a job; its completed rounds stay on the server."""
    config = resolve_admin(workspace, admin_config)

    async def go() -> None:
        async with Admin(config) as admin:
            await admin.abort(job_id)

    run(go())
    console.print(f"aborted job {job_id}")


@app.command()
def download(
    job_id: str,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write global.safetensors into.")],
    workspace: WorkspaceOption = None,
    admin_config: AdminConfigOption = None,
) -> None:
    """Download a job's latest global model as safetensors."""
    config = resolve_admin(workspace, admin_config)

    async def go() -> tuple[Path, int]:
        async with Admin(config) as admin:
            return await admin.download(job_id, out)

    path, round = run(go())
    console.print(f"wrote {path} (global model after round {round})")


@app.command()
def digest(
    job_dir: Annotated[Path, typer.Argument(help="Job folder with a job.toml.", exists=True, file_okay=False)],
) -> None:
    """Print the digest of a job's code (every file but job.toml), for a site's trusted_code."""
    try:
        load_job(job_dir)
        value = code_digest(job_dir)
    except HaulerError as error:
        fail(error)
    console.print(value, highlight=False)
    errors.print(f"a site with allow_custom_code = false runs this job once its site.toml has\n"
                 f"  trusted_code = [\"{value}\"]", highlight=False)
