"""Figures for reports, with matplotlib imported where one is drawn: every CLI command imports
the report module, and matplotlib's import costs about a second, more on a busy machine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure of Agg's (no pyplot, no display), laid out by matplotlib."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def legend_patch(color: str, label: str) -> Any:
    """A legend's coloured square."""
    from matplotlib.patches import Patch

    return Patch(color=color, label=label)


def hatched_cell(column: int, row: int) -> Any:
    """A heat map's cell drawn as missing: grey, hatched."""
    from matplotlib.patches import Rectangle

    return Rectangle(
        (column - 0.5, row - 0.5), 1, 1, facecolor="lightgrey", hatch="//", edgecolor="grey"
    )
