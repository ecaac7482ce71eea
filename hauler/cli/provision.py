"""`hauler provision`: the project CA and a startup kit per participant, from PROJECT.yml."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hauler import security
from hauler.cli.common import console, fail
from hauler.core.errors import HaulerError


def provision(
    project_file: Annotated[
        Path, typer.Argument(help="Project file (YAML): name, server, sites, admins.")
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Folder of the CA and the startup kits.")
    ],
    add_site: Annotated[
        list[str] | None,
        typer.Option(
            "--add-site",
            help="Issue only this site's kit (listed in the project file); repeatable.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Re-issue kits that already exist.")
    ] = False,
) -> None:
    """Write the project CA (reused if OUT has one) and a startup kit for every participant.

    Give each participant its folder; the CA's key stays in OUT/ca and is in no kit.
    """
    try:
        kits = security.provision(project_file, out_dir, add_site, overwrite=overwrite)
    except HaulerError as error:
        fail(error)
    for kit in kits:
        console.print(f"kit [bold]{kit.name}[/bold]: {kit}")
    console.print(f"{len(kits)} kits written; the CA's key stays in {out_dir / 'ca'}")
    if add_site:
        console.print(
            "the server kit's server.toml now lists the new sites: copy it to the server and "
            "restart the server"
        )
