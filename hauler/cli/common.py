"""What every command shares: option aliases, error rendering, and running coroutines."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from hauler.admin.poc import admin_config
from hauler.core.config import AdminConfig, load_toml
from hauler.core.errors import ConfigError, HaulerError

T = TypeVar("T")
console = Console()
errors = Console(stderr=True)

WorkspaceOption = Annotated[
    Path | None, typer.Option("--workspace", "-w", help="A POC workspace (from `hauler poc prepare`).")
]
AdminConfigOption = Annotated[
    Path | None, typer.Option("--kit", "-k", help="An admin's startup kit folder (or its admin.toml).")
]
DEBUG = {"enabled": False}


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; a HaulerError becomes one line on stderr and its exit code."""
    try:
        return asyncio.run(work)
    except HaulerError as error:
        fail(error)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def fail(error: HaulerError) -> None:
    if DEBUG["enabled"]:
        raise error
    errors.print(f"[red]error:[/red] {error}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(error.exit_code)


def resolve_admin(workspace: Path | None, kit: Path | None) -> AdminConfig:
    """The admin config from a startup kit (`--kit`), or from a POC `--workspace`."""
    try:
        if kit is not None:
            return load_toml(AdminConfig, kit / "admin.toml" if kit.is_dir() else kit)
        if workspace is not None:
            return admin_config(workspace)
        raise ConfigError("say where the server is: --workspace DIR (a POC) or --kit DIR (an admin's startup kit)")
    except HaulerError as error:
        fail(error)
        raise
