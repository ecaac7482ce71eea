"""A job's figures and summary, from its metrics records (`Admin.metrics`).

`build_report` arranges the records: CPU and memory series per process, a timeline of every
site's download, train and upload and the server's aggregation per round, the metrics each
site reported per round (loss, accuracy, ...), and a cross-site evaluation's matrix
(`admin/matrix.py`). `write_figures`
draws them as PNGs (matplotlib's Agg renderer, through Figure objects: no pyplot, no display,
no global state); `round_table`, `transfer_table` (bytes moved, raw and encoded, and the
compression) and `process_table` summarise them.
Times are seconds from the job's start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Column, Table

from hauler.admin.figures import legend_patch, new_figure
from hauler.admin.matrix import FIGURE as MATRIX_FIGURE
from hauler.admin.matrix import Matrix, build_matrix, matrix_figure
from hauler.workflows.records import reported

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn: every CLI command imports this
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIB = 1 << 20
SERVER = "server"
PHASES = {
    "download": "tab:blue",
    "train": "tab:green",
    "upload": "tab:orange",
    "aggregate": "tab:purple",
}
FIGURES = ("cpu.png", "memory.png", "timeline.png", "metrics.png")
METRICS_PER_ROW = 2
LABEL_GAP = 0.08  # round labels on the timeline stay this share of its width apart


@dataclass
class Series:
    """One process's samples: seconds from the job's start, CPU percent (100 = one core), MiB."""

    t_s: list[float] = field(default_factory=list)
    cpu_percent: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    rss_anon_mib: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Bar:
    """One phase of one round on one row of the timeline (a site, or the server for aggregate);
    a transfer's bar says how it was encoded (`label`)."""

    row: str
    round: int
    phase: str
    start_s: float
    duration_s: float
    label: str = ""


@dataclass
class Report:
    job: dict[str, Any]
    origin_s: float  # unix time of the job's start: 0 on every time axis
    processes: dict[str, Series]  # the server first, then sites by name
    bars: list[Bar]
    sites: list[dict[str, Any]]  # the `site` records: one per site and round
    rounds: list[dict[str, Any]]  # the `round` records
    matrix: Matrix | None = None  # a cross-site evaluation's, if the job ran one


def build_report(job: dict[str, Any], records: list[dict[str, Any]]) -> Report:
    """Arrange a job's record (from `status`) and metrics records for figures and tables."""
    by_kind: dict[str, list[dict[str, Any]]] = {"resources": [], "site": [], "round": []}
    for record in records:
        by_kind.setdefault(record.get("kind", ""), []).append(record)
    starts = [r["t"] for r in by_kind["resources"]] + [
        r["started_s"] for r in by_kind["site"] if "started_s" in r
    ]
    origin = min([job["started_s"], *starts] if job.get("started_s") else starts or [0.0])
    return Report(
        job,
        origin,
        _series(by_kind["resources"], origin),
        _bars(by_kind, origin),
        sorted(by_kind["site"], key=lambda r: (r["round"], r["site"])),
        sorted(by_kind["round"], key=lambda r: r["round"]),
        build_matrix(records),
    )


def _series(samples: list[dict[str, Any]], origin: float) -> dict[str, Series]:
    processes: dict[str, Series] = {}
    for sample in sorted(samples, key=lambda s: s["t"]):
        series = processes.setdefault(sample["process"], Series())
        series.t_s.append(sample["t"] - origin)
        series.cpu_percent.append(sample["cpu_percent"])
        series.rss_mib.append(sample["rss_bytes"] / MIB)
        series.rss_anon_mib.append(sample["rss_anon_bytes"] / MIB)
    return {name: processes[name] for name in sorted(processes, key=lambda n: (n != SERVER, n))}


def _bars(by_kind: dict[str, list[dict[str, Any]]], origin: float) -> list[Bar]:
    """Bars placed by the records' start times (records written before they had one are left
    out)."""
    bars = []
    for record in by_kind["site"]:
        if "started_s" not in record:
            continue
        start = record["started_s"] - origin
        for phase in ("download", "train", "upload"):
            label = encoding_label(record.get(phase, {})) if phase != "train" else ""
            duration = record[f"{phase}_s"]
            bars.append(Bar(record["site"], record["round"], phase, start, duration, label))
            start += duration
    for record in by_kind["round"]:
        if "started_s" in record:
            start = record["started_s"] - origin + record["round_s"] - record["aggregate_s"]
            bars.append(Bar(SERVER, record["round"], "aggregate", start, record["aggregate_s"]))
    return bars


def encoding_label(transfer: dict[str, Any]) -> str:
    """ "int8 3.9x" for a transfer that travelled encoded; "" for one that did not."""
    codec = transfer.get("codec", "none")
    if codec == "none":
        return ""
    return f"{codec} {compression(transfer):.1f}x"


def compression(transfer: dict[str, Any]) -> float:
    """Model bytes per byte on the wire (1 when nothing is known)."""
    wire = transfer.get("wire_bytes") or 0
    return transfer.get("bytes", 0) / wire if wire else 1.0


def write_figures(report: Report, out_dir: Path) -> list[Path]:
    """Draw cpu.png, memory.png, timeline.png, (if sites reported any) metrics.png and (after a
    cross-site evaluation) cross_site.png into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawings = (_cpu_figure, _memory_figure, _timeline_figure, _metrics_figure, _matrix_figure)
    paths = []
    for name, draw in zip((*FIGURES, MATRIX_FIGURE), drawings):
        figure = draw(report)
        if figure is not None:
            figure.savefig(out_dir / name, dpi=100)
            paths.append(out_dir / name)
    return paths


def _title(report: Report, what: str) -> str:
    return f"{what} - job {report.job.get('id', '?')} ({report.job.get('name', '?')})"


def _matrix_figure(report: Report) -> Figure | None:
    return matrix_figure(report.matrix, _title(report, "Cross-site evaluation"))


def _cpu_figure(report: Report) -> Figure:
    figure = new_figure(figsize=(9, 4))
    axes = figure.subplots()
    for process, series in report.processes.items():
        # each reading covers the second before it: steps, not slopes
        axes.plot(
            series.t_s, series.cpu_percent, label=process, linewidth=1.2, drawstyle="steps-pre"
        )
    axes.set(
        title=_title(report, "CPU per process"),
        xlabel="seconds from job start",
        ylabel="CPU % (100 = one core)",
    )
    axes.set_ylim(bottom=0)
    _finish(axes, report)
    return figure


def _memory_figure(report: Report) -> Figure:
    figure = new_figure(figsize=(9, 6))
    rss, anon = figure.subplots(2, 1, sharex=True)
    for process, series in report.processes.items():
        rss.plot(series.t_s, series.rss_mib, label=process, linewidth=1.2, marker=".", markersize=3)
        anon.plot(
            series.t_s, series.rss_anon_mib, label=process, linewidth=1.2, marker=".", markersize=3
        )
    rss.set(title=_title(report, "Memory per process"), ylabel="RSS MiB (with mapped model pages)")
    anon.set(xlabel="seconds from job start", ylabel="RssAnon MiB (anonymous)")
    for axes in (rss, anon):
        axes.set_ylim(bottom=0)
        _finish(axes, report)
    return figure


def _finish(axes: Axes, report: Report) -> None:
    axes.set_xlim(left=0)
    axes.grid(alpha=0.3)
    if report.processes:
        axes.legend(loc="upper left", fontsize="small")


def _timeline_figure(report: Report) -> Figure:
    rows = sorted(
        {SERVER, *(bar.row for bar in report.bars)}, key=lambda n: (n == SERVER, n)
    )  # sites, server
    figure = new_figure(figsize=(9, 1.2 + 0.6 * len(rows)))
    axes = figure.subplots()
    for bar in report.bars:
        axes.barh(
            rows.index(bar.row),
            bar.duration_s,
            left=bar.start_s,
            height=0.6,
            color=PHASES[bar.phase],
        )
        if bar.label:
            axes.annotate(
                bar.label,
                (bar.start_s + bar.duration_s / 2, rows.index(bar.row)),
                ha="center",
                va="center",
                fontsize="x-small",
                color="white",
            )
    starts = [
        (record["round"], record["started_s"] - report.origin_s)
        for record in report.rounds
        if "started_s" in record
    ]
    span = max(
        [bar.start_s + bar.duration_s for bar in report.bars]
        + [start for _, start in starts]
        + [1e-9]
    )
    labelled = -span
    for round, start in starts:
        axes.axvline(start, color="grey", linestyle=":", linewidth=1)
        if (
            start - labelled >= LABEL_GAP * span
        ):  # a label only where it does not overprint the last one
            labelled = start
            axes.annotate(
                f"round {round}",
                (start, 0),
                xycoords=("data", "axes fraction"),
                xytext=(2, 2),
                textcoords="offset points",
                fontsize="small",
                color="grey",
            )
    axes.set_yticks(range(len(rows)), rows)
    axes.invert_yaxis()
    axes.set(title=_title(report, "Rounds"), xlabel="seconds from job start")
    axes.set_xlim(left=0)
    axes.grid(axis="x", alpha=0.3)
    figure.legend(
        handles=[legend_patch(color, phase) for phase, color in PHASES.items()],
        loc="outside lower center",
        fontsize="small",
        ncols=len(PHASES),
    )
    return figure


def metric_names(report: Report) -> list[str]:
    """Every numeric metric any site reported, sorted."""
    return sorted(
        {
            name
            for record in report.sites
            for name, value in reported(record).items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
    )


def _metrics_figure(report: Report) -> Figure | None:
    """A panel per metric: its value per round, a line per site; None if no site reported one."""
    names = metric_names(report)
    if not names:
        return None
    columns = min(len(names), METRICS_PER_ROW)
    rows = -(-len(names) // columns)
    figure = new_figure(figsize=(4.5 * columns, 3.2 * rows + 0.6))
    panels = figure.subplots(rows, columns, squeeze=False).flat
    for name, axes in zip(names, panels):
        for site in sorted({record["site"] for record in report.sites}):
            points = [
                (r["round"], reported(r)[name])
                for r in report.sites
                if r["site"] == site and name in reported(r)
            ]
            if points:
                axes.plot(*zip(*points), label=site, marker="o", markersize=3, linewidth=1.2)
        axes.set(title=name, xlabel="round")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
    for axes in panels:  # the panels left over when the metrics do not fill the last row
        axes.set_visible(False)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    if len(labels) <= 16:  # beyond that a legend hides the lines it names
        figure.legend(
            handles, labels, loc="outside lower center", fontsize="small", ncols=min(len(labels), 8)
        )
    figure.suptitle(_title(report, "Metrics the sites reported"))
    return figure


def round_table(report: Report) -> Table:
    """Per round and site: phase seconds, transfer rates and re-sent bytes."""
    numbers = [
        Column(name, justify="right")
        for name in ("down s", "train s", "up s", "down MB/s", "up MB/s", "re-sent MiB")
    ]
    table = Table("round", "site", *numbers, title="rounds (per site)")
    for record in report.sites:
        down, up = record.get("download", {}), record.get("upload", {})
        resent = down.get("bytes_resent", 0) + up.get("bytes_resent", 0)
        table.add_row(
            str(record["round"]),
            record["site"],
            f"{record['download_s']:.2f}",
            f"{record['train_s']:.2f}",
            f"{record['upload_s']:.2f}",
            f"{down.get('mb_per_s', 0):.0f}",
            f"{up.get('mb_per_s', 0):.0f}",
            f"{resent / MIB:.1f}",
        )
    return table


def transfer_table(sites: list[dict[str, Any]]) -> Table:
    """Per round and site, each direction's codec, model and wire MiB and compression ratio."""
    numbers = [
        Column(name, justify="right")
        for name in ("down MiB", "wire", "ratio", "up MiB", "wire", "ratio")
    ]
    table = Table("round", "site", "codecs", *numbers, title="bytes moved (per site)")
    for record in sites:
        down, up = record.get("download", {}), record.get("upload", {})
        codecs = f"{down.get('codec', 'none')}/{up.get('codec', 'none')}"
        cells = []
        for transfer in (down, up):
            wire = transfer.get("wire_bytes", transfer.get("bytes", 0))
            cells += [
                f"{transfer.get('bytes', 0) / MIB:.1f}",
                f"{wire / MIB:.1f}",
                f"{compression(transfer):.1f}x",
            ]
        table.add_row(str(record["round"]), record["site"], codecs, *cells)
    return table


def metrics_table(report: Report) -> Table | None:
    """Per round and site, the training metrics the site reported (a column each); None if there are
    none."""
    names = metric_names(report)
    if not names:
        return None
    table = Table(
        "round",
        "site",
        *(Column(name, justify="right") for name in names),
        title="training metrics",
    )
    for record in report.sites:
        values = reported(record)
        table.add_row(
            str(record["round"]),
            record["site"],
            *(f"{values[name]:.4g}" if name in values else "" for name in names),
        )
    return table


def process_table(report: Report) -> Table:
    """Per process: samples, mean CPU, peak RSS and peak RssAnon."""
    table = Table(
        "process", "samples", "mean CPU %", "peak RSS MiB", "peak RssAnon MiB", title="processes"
    )
    for process, series in report.processes.items():
        table.add_row(
            process,
            str(len(series.t_s)),
            f"{sum(series.cpu_percent) / len(series.cpu_percent):.0f}",
            f"{max(series.rss_mib):.0f}",
            f"{max(series.rss_anon_mib):.0f}",
        )
    return table
