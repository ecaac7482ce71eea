"""`hauler poc ...`: a local federation of real processes, for trying Hauler on one machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hauler.admin import poc
from hauler.cli.common import console, fail
from hauler.core.errors import HaulerError

app = typer.Typer(
    help="Prepare, start and stop a local federation.", no_args_is_help=True, rich_markup_mode=None
)
Workspace = Annotated[
    Path, typer.Option("--workspace", "-w", help="Folder of the local federation.")
]
HERE = Path("poc")


@app.command()
def prepare(
    workspace: Workspace = HERE,
    sites: Annotated[int, typer.Option("--sites", "-n", min=1, help="Number of sites.")] = 2,
    control_port: Annotated[int, typer.Option(help="Server control port; 0 picks a free one.")] = 0,
    data_port: Annotated[int, typer.Option(help="Server data port; 0 picks a free one.")] = 0,
    plaintext: Annotated[
        bool, typer.Option(help="No TLS, to measure its cost; never for real data.")
    ] = False,
) -> None:
    """Provision a server, N sites and an admin (project CA, mutual TLS, one kit each)."""
    try:
        written = poc.prepare(
            workspace, sites, control_port=control_port, data_port=data_port, plaintext=plaintext
        )
    except HaulerError as error:
        fail(error)
    console.print(f"prepared {len(written) - 2} sites in {workspace.resolve()}")


@app.command()
def start(
    workspace: Workspace = HERE,
    wait_s: Annotated[
        float, typer.Option(help="Seconds to wait for every site to connect.")
    ] = 60.0,
) -> None:
    """Start the server and every site as background processes; returns once all are connected."""
    try:
        pids = poc.start(workspace, wait_s=wait_s)
    except HaulerError as error:
        fail(error)
    for role, pid in pids.items():
        console.print(f"{role}: pid {pid}")


@app.command()
def stop(workspace: Workspace = HERE) -> None:
    """Stop the server, then every site (by the PIDs recorded): a running job stays running, to
    resume at the next `hauler poc start`."""
    stopped = poc.stop(workspace)
    console.print(f"stopped {', '.join(stopped) or 'nothing (none was running)'}")
