"""A job's report as TensorBoard event files, one run folder per process (`DIR/<process>/`):
each site's training and validation metrics and phase seconds per round (step = round), and
every process's CPU and memory (step = sample number, one a second; wall time = when it was
taken)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hauler.admin.report import Report, Series
from hauler.core.errors import ConfigError


def write_tensorboard(report: Report, out_dir: Path) -> list[Path]:
    """Write one event file per process under `out_dir/<process>/`; returns the run folders."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard needs tensorboardX: pip install 'hauler[tensorboard]'"
        ) from None
    runs = sorted({*report.processes, *(record["site"] for record in report.sites)})
    for run in runs:
        with SummaryWriter(str(out_dir / run)) as writer:
            _write_rounds(writer, [record for record in report.sites if record["site"] == run])
            if run in report.processes:
                _write_resources(writer, report.processes[run], report.origin_s)
    return [out_dir / run for run in runs]


def _write_rounds(writer: Any, records: list[dict[str, Any]]) -> None:
    for record in records:
        walltime = record.get("started_s")
        for kind, tag in (("metrics", "train"), ("validation", "validation")):
            for name, value in record.get(kind, {}).items():
                writer.add_scalar(f"{tag}/{name}", value, record["round"], walltime)
        for phase in ("download", "train", "upload"):
            writer.add_scalar(f"seconds/{phase}", record[f"{phase}_s"], record["round"], walltime)


def _write_resources(writer: Any, series: Series, origin_s: float) -> None:
    for step, t in enumerate(series.t_s):
        walltime = origin_s + t
        writer.add_scalar("resources/cpu_percent", series.cpu_percent[step], step, walltime)
        writer.add_scalar("resources/rss_mib", series.rss_mib[step], step, walltime)
        writer.add_scalar("resources/rss_anon_mib", series.rss_anon_mib[step], step, walltime)
