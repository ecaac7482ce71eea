"""What every command shares: option aliases, error rendering, and opening a session."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from hauler.admin import api
from hauler.core.errors import ConfigError, HaulerError

console = Console()
errors = Console(stderr=True)
DEFAULT_WORKSPACE = Path("poc")  # what `hauler poc prepare` makes when told nothing

WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="A POC workspace (`hauler poc prepare`) or a "
        "simulation's (`hauler simulate`); ./poc when it exists and no --kit is given.",
    ),
]
AdminConfigOption = Annotated[
    Path | None,
    typer.Option("--kit", "-k", help="An admin's startup kit folder (or its admin.toml)."),
]
DEBUG = {"enabled": False}


def fail(error: HaulerError) -> NoReturn:
    """One line on stderr and the error's exit code (the traceback only under --debug)."""
    if DEBUG["enabled"]:
        raise error
    errors.print(f"[red]error:[/red] {error}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(error.exit_code)


@contextlib.contextmanager
def failing_plainly() -> Iterator[None]:
    """Run a command's body: Hauler's errors as one line, Ctrl-C as exit status 130."""
    try:
        yield
    except HaulerError as error:
        fail(error)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@contextlib.contextmanager
def session(workspace: Path | None, kit: Path | None) -> Iterator[Any]:
    """A session with the server of `--kit` or `--workspace` (./poc if neither and it exists);
    a server slow to answer is said on stderr while it is waited for."""
    if kit is None and workspace is None:
        if not (DEFAULT_WORKSPACE / "server" / "server.toml").exists():
            fail(
                ConfigError(
                    "say where the server is: --workspace DIR (a POC or a simulation) or "
                    "--kit DIR (an admin's startup kit)"
                )
            )
        workspace = DEFAULT_WORKSPACE
    with failing_plainly():
        opened = api.connect(workspace=workspace, kit=kit, on_wait=lambda text: errors.print(text))
        with opened:
            yield opened


def where(workspace: Path | None, kit: Path | None) -> str:
    """The options that name the same server again, for commands a message suggests."""
    return f"--kit {kit}" if kit is not None else f"--workspace {workspace or DEFAULT_WORKSPACE}"
