"""The `hauler` command."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hauler.cli import jobs, poc, provision, simulate, sites
from hauler.cli.common import DEBUG, fail
from hauler.core import logs
from hauler.core.config import ServerConfig, SiteConfig, load_toml
from hauler.core.errors import HaulerError

app = typer.Typer(
    help="Federated learning for models larger than memory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(poc.app, name="poc")
app.add_typer(jobs.app, name="jobs")
app.command()(jobs.submit)
app.command()(simulate.simulate)
app.command()(sites.sites)
app.command()(provision.provision)
Config = Annotated[Path, typer.Option("--config", "-c", help="TOML config file.")]


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress on stderr, not only warnings.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    logs.configure(verbose)
    DEBUG["enabled"] = debug


@app.command()
def server(config: Config) -> None:
    """Run the server in the foreground."""
    from hauler.server import Server

    try:
        settings = load_toml(ServerConfig, config)
        logs.write_to(settings.workspace / "logs" / "server.log")
        _run_until_signal(Server(settings).serve())
    except HaulerError as error:
        fail(error)


@app.command()
def client(config: Config) -> None:
    """Run a site in the foreground."""
    from hauler.admin.progress import transfer_display
    from hauler.client import Site

    try:
        settings = load_toml(SiteConfig, config)
        logs.write_to(settings.workspace / "logs" / f"{settings.name}.log")
        with transfer_display(Console(stderr=True)) as track:
            _run_until_signal(Site(settings, track=track).run())
    except HaulerError as error:
        fail(error)


def _run_until_signal(work) -> None:  # type: ignore[no-untyped-def]
    """Run a role until SIGTERM or SIGINT, then shut it down cleanly."""

    async def main() -> None:
        task = asyncio.ensure_future(work)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
