"""``phasetrain plot RUN_DIR``: a run's curves and phase timeline as one PNG (or SVG, PDF) through matplotlib,
an optional extra (``pip install phasetrain[plot]``) imported by this command only.

Example::

    from phasetrain.plot import plot_run
    figure = plot_run(pathlib.Path("runs/digits"), pathlib.Path("curves.png"))
"""
from __future__ import annotations

import math
import pathlib
from typing import TYPE_CHECKING

from phasetrain.curves import Curves, Panel, curves, phase_colours, read_records
from phasetrain.errors import ConfigError, RunDirError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

def plot_run(run_dir: pathlib.Path, output: pathlib.Path, metrics: list[str] | None = None) -> Figure:
    """Draw the run's curves (``metrics`` only, if given) and its phase timeline into ``output``."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("phasetrain plot draws with matplotlib, which is not installed: "
                          "pip install 'phasetrain[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # no display needed; a file is the output
    from matplotlib import pyplot
    drawn = curves(read_records(run_dir), metrics)
    if not drawn.panels and not drawn.visits:
        raise RunDirError(f"{run_dir} has no records yet (no phase has ended): nothing to plot")
    rows = len(drawn.panels) + (1 if drawn.visits else 0)
    figure, axes = pyplot.subplots(max(rows, 1), 1, figsize=(9, 2.6 * max(rows, 1)), squeeze=False)
    for ax, panel in zip(axes[:, 0], drawn.panels, strict=False):
        for series in panel.series:
            xs, ys = zip(*series.points, strict=True)
            if series.per_step:
                ax.plot(xs, ys, color=series.colour, linewidth=0.8, alpha=0.45, label=series.name)
            else:
                ax.plot(xs, ys, color=series.colour, marker="o", markersize=3, linewidth=1.6, label=series.name)
        _mark_not_finite(ax, panel)
        ax.set_ylabel(panel.unit)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if drawn.visits:
        _timeline(axes[len(drawn.panels), 0], drawn)
    figure.suptitle(f"{run_dir.name}: curves by optimizer step, and where the time went")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    pyplot.close(figure)
    return figure


def _mark_not_finite(ax: Axes, panel: Panel) -> None:
    """A cross at the top edge where a curve's value was not finite (matplotlib leaves a gap there)."""
    top = ax.get_ylim()[1]
    for series in panel.series:
        steps = [x for x, y in series.points if not math.isfinite(y)]
        if steps:
            ax.plot(steps, [top] * len(steps), "x", color=series.colour, markersize=7, clip_on=False)


def _timeline(ax: Axes, drawn: Curves) -> None:
    colours = phase_colours(drawn.visits)
    phases = list(colours)
    for row, phase in enumerate(phases):
        bars = [(visit.start, visit.seconds) for visit in drawn.visits if visit.phase == phase]
        ax.broken_barh(bars, (row - 0.4, 0.8), color=colours[phase])
    ax.set_yticks(range(len(phases)), phases)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run started")
    ax.set_title("phase timeline", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
