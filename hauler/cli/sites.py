"""`hauler sites`: the sites connected to the server now."""

from __future__ import annotations

import time

from rich.table import Table

from hauler.cli.common import AdminConfigOption, WorkspaceOption, console, session


def sites(workspace: WorkspaceOption = None, admin_config: AdminConfigOption = None) -> None:
    """The sites connected now: name, organisation, since when, last heartbeat, what they do."""
    with session(workspace, admin_config) as opened:
        connected = opened.sites()
    table = Table("site", "org", "connected since", "last heartbeat", "state", "task")
    now = time.time()
    for site in connected:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(site["connected_s"]))
        beat = f"{now - site['heartbeat_s']:.0f} s ago" if site.get("heartbeat_s") else "-"
        table.add_row(
            site["name"],
            site.get("org") or "-",
            since,
            beat,
            "connected" if site["attached"] else "away",
            site.get("task") or "-",
        )
    console.print(table)
    console.print(
        f"{sum(site['attached'] for site in connected)} of {len(connected)} sites connected",
        highlight=False,
    )
