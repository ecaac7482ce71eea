"""A cross-site evaluation's matrix, from a job's metrics records: a row per evaluating site, a
column per model evaluated ("global", then the sites' local models), a value per metric.

A cell is a number, `missing` (the site failed it or was gone: its `evaluation` record says
why) or not evaluated (a site's own model, and every local model at a site that keeps its own).
`matrix_tables` prints it, one table per metric; `matrix_figure` draws it as a heat map, a panel
per metric, missing cells hatched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Column, Table

from hauler.admin.figures import hatched_cell, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE = "cross_site.png"
MISSING = "missing"
NOT_EVALUATED = "-"
PANELS_PER_ROW = 2

Cell = tuple[str, str]  # (evaluating site, model)


@dataclass
class Matrix:
    sites: list[str]
    models: list[str]
    kept: list[str] = field(default_factory=list)  # sites that keep their local model
    values: dict[str, dict[Cell, float]] = field(default_factory=dict)  # metric -> cell -> value
    missing: dict[Cell, str] = field(default_factory=dict)  # cell -> why

    def text(self, metric: str | None, cell: Cell) -> str:
        """A cell as the table shows it (`metric` None: whether it is missing, only)."""
        measured = self.values.get(metric or "", {})
        if cell in measured:
            return f"{measured[cell]:.4g}"
        return MISSING if cell in self.missing else NOT_EVALUATED


def build_matrix(records: list[dict[str, Any]]) -> Matrix | None:
    """The matrix of a job's `evaluation` records (the last one of each cell counts), laid out
    as its `cross_site` record says, if it got that far; None without any evaluation."""
    cells = {(r["site"], r["model"]): r for r in records if r.get("kind") == "evaluation"}
    if not cells:
        return None
    summary = next((r for r in reversed(records) if r.get("kind") == "cross_site"), {})
    models = {model for _, model in cells}
    matrix = Matrix(
        summary.get("sites") or sorted({site for site, _ in cells}),
        summary.get("models") or sorted(models, key=lambda m: (m != "global", m)),
        summary.get("kept", []),
    )
    for cell, record in cells.items():
        if "missing" in record:
            matrix.missing[cell] = record["missing"]
        for name, value in record.get("metrics", {}).items():
            matrix.values.setdefault(name, {})[cell] = value
    return matrix


def matrix_tables(matrix: Matrix) -> list[Table]:
    """A table per metric: a row per evaluating site, a column per model."""
    caption = "a row per site evaluating, a column per model evaluated"
    caption += f"; not shared: {', '.join(matrix.kept)}" if matrix.kept else ""
    tables = []
    for metric in sorted(matrix.values) or [None]:
        columns = (Column(m, justify="right") for m in matrix.models)
        title = f"cross-site evaluation: {metric or 'no metric'}"
        table = Table("site", *columns, title=title, caption=caption)
        for site in matrix.sites:
            table.add_row(site, *(matrix.text(metric, (site, m)) for m in matrix.models))
        tables.append(table)
    return tables


def matrix_figure(matrix: Matrix | None, title: str) -> Figure | None:
    """A heat map per metric (None if nothing was measured): each cell's value written in it,
    missing cells hatched grey, cells not evaluated left blank."""
    if matrix is None or not matrix.values:
        return None
    names = sorted(matrix.values)
    columns = min(len(names), PANELS_PER_ROW)
    rows = -(-len(names) // columns)
    width = 1.2 + 0.9 * len(matrix.models)
    height = 0.9 + 0.45 * len(matrix.sites)
    figure = new_figure(figsize=(width * columns + 1, height * rows + 0.8))
    panels = figure.subplots(rows, columns, squeeze=False).flat
    for name, axes in zip(names, panels):
        _panel(axes, matrix, name)
    for axes in panels:  # panels left over when the metrics do not fill the last row
        axes.set_visible(False)
    figure.suptitle(title)
    return figure


def _panel(axes: Any, matrix: Matrix, metric: str) -> None:
    values = np.full((len(matrix.sites), len(matrix.models)), np.nan)
    for (site, model), value in matrix.values[metric].items():
        if site in matrix.sites and model in matrix.models:
            values[matrix.sites.index(site), matrix.models.index(model)] = value
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    axes.figure.colorbar(image, ax=axes, shrink=0.8)
    for row, site in enumerate(matrix.sites):
        for column, model in enumerate(matrix.models):
            _annotate(axes, matrix, metric, (site, model), (row, column), values)
    axes.set_xticks(range(len(matrix.models)), matrix.models, rotation=30, ha="right")
    axes.set_yticks(range(len(matrix.sites)), matrix.sites)
    axes.set(title=metric, xlabel="model evaluated", ylabel="evaluated at")


def _annotate(
    axes: Any, matrix: Matrix, metric: str, cell: Cell, at: tuple[int, int], values: np.ndarray
) -> None:
    """Write a cell's value in it, or hatch it if it is missing."""
    row, column = at
    if cell in matrix.missing:
        axes.add_patch(hatched_cell(column, row))
        axes.text(column, row, MISSING, ha="center", va="center", fontsize="small")
    elif not np.isnan(values[row, column]):
        bright = values[row, column] > np.nanmean(values)
        colour = "black" if bright else "white"
        axes.text(column, row, f"{values[row, column]:.3g}", ha="center", va="center", color=colour)
