"""`hauler simulate`: a job on N virtual sites on this machine (or a Ray cluster), to develop it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hauler.admin import api
from hauler.admin.report import build_report
from hauler.cli.common import console, failing_plainly
from hauler.cli.jobs import JobDir, show_summary


def simulate(
    job_dir: JobDir,
    sites: Annotated[
        int, typer.Option("--sites", "-n", min=1, help="Virtual sites, named site-1..site-N.")
    ] = 2,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Sites training at once (default: the cores); the memory is one "
            "model per worker, whatever --sites is.",
        ),
    ] = None,
    workspace: Annotated[
        Path, typer.Option("--workspace", "-w", help="Where the job's folder is written.")
    ] = Path("sim"),
    site_settings: Annotated[
        Path | None,
        typer.Option(
            "--site-settings",
            exists=True,
            dir_okay=False,
            help="A TOML file with a table per site "
            "([site-1] data_dir = ...), over the default site_index and num_sites.",
        ),
    ] = None,
    initial_model: Annotated[
        Path | None,
        typer.Option(
            "--initial-model", exists=True, dir_okay=False, help="A safetensors file to start from."
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run the workers as actors on this Ray cluster (an address, or auto); needs "
            "pip install 'hauler[ray]'.",
        ),
    ] = None,
    worker_cpus: Annotated[float, typer.Option("--worker-cpus", help="CPUs per Ray worker.")] = 1.0,
    worker_gpus: Annotated[float, typer.Option("--worker-gpus", help="GPUs per Ray worker.")] = 0.0,
) -> None:
    """Run a job on N virtual sites, W at a time: the same workflow, aggregation, client API and
    data path as a federation, writing the job folder a server would."""
    with failing_plainly():
        job = api.simulate(
            job_dir,
            sites=sites,
            workers=workers,
            workspace=workspace,
            settings=site_settings,
            initial_model=initial_model,
            ray=ray,
            worker_cpus=worker_cpus,
            worker_gpus=worker_gpus,
            progress=True,
            console=console,
        )
        show_summary(build_report(job.record(), job.metrics()))
    console.print(
        f"job {job.id} finished in {job.folder.folder}; inspect it with "
        f"`hauler jobs report {job.id} -o report --workspace {workspace}`",
        highlight=False,
    )
