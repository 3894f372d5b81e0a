"""``phasetrain report RUN_DIR``: one self-contained HTML page of a run. No network, no script: the curves
and the phase timeline are inline SVG drawn here, the phase graph is Graphviz's SVG (the phase the run is in
or stopped in highlighted; without Graphviz, its Mermaid text).

Sections, in order: where the run stands, final metrics, curves, where the time went, phase graph,
checkpoints, config. Reads the run folder only (``metrics.jsonl``, ``config.yaml``, ``graph.json``,
``checkpoints/``); imports no torch and runs none of the config's code.
"""
from __future__ import annotations

import datetime
import html
import math
import pathlib
from typing import Any

import yaml

from phasetrain.curves import Panel, Visit, curves, phase_colours, read_records, seconds_per_phase
from phasetrain.errors import PhasetrainError
from phasetrain.graph import FIRST
from phasetrain.run_folder import RunFolder, best_first, read_latest, read_summary
from phasetrain.timing import shares

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 980px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.status { color: #555; } table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; } th { background: #f4f4f4; }
td.number { text-align: right; font-variant-numeric: tabular-nums; } tr.best td { background: #eef7ee; font-weight: 600; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; } svg { display: block; margin: 0.4em 0; max-width: 100%; height: auto; }
"""


def write_report(run_dir: pathlib.Path, output: pathlib.Path) -> pathlib.Path:
    """Write the report of the run in ``run_dir`` to ``output``; returns ``output``."""
    from phasetrain.run_folder import atomic_write_text
    atomic_write_text(output, report_html(run_dir))
    return output


def report_html(run_dir: pathlib.Path) -> str:
    folder = RunFolder(run_dir)
    if not folder.config_file.is_file():
        raise PhasetrainError(f"{run_dir} is not a run folder: it has no {folder.config_file.name}")
    drawn = curves(read_records(run_dir))
    config = yaml.safe_load(folder.config_file.read_text())
    sections = [
        ("Final metrics", _final_metrics(drawn.final)),
        ("Curves", "\n".join(svg_chart(panel) for panel in drawn.panels) or "<p>No records yet.</p>"),
        ("Where the time went", _time(drawn.visits)),
        ("Phase graph", _graph(folder, drawn.visits)),
        ("Checkpoints", _checkpoints(folder, config.get("checkpoint", {}))),
        ("Config", f"<pre>{html.escape(folder.config_file.read_text())}</pre>"),
    ]
    body = "\n".join(f'<section id="{_anchor(title)}">\n<h2>{title}</h2>\n{content}\n</section>'
                     for title, content in sections)
    made = datetime.datetime.now().isoformat(timespec="seconds")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>phasetrain run {html.escape(folder.path.name)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>Run {html.escape(folder.path.name)}</h1>\n"
            f'<p class="status">{html.escape(folder.describe_position())}. Report made {made}.</p>\n'
            f"{body}\n</body>\n</html>\n")


def _anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def _final_metrics(final: dict[str, float]) -> str:
    if not final:
        return "<p>No epoch has ended yet.</p>"
    rows = "".join(f'<tr><td>{html.escape(name)}</td><td class="number">'
                   f'{f"{value:.6g}" if math.isfinite(value) else "not finite (NaN or infinity)"}</td></tr>'
                   for name, value in final.items())
    return f"<table><tr><th>metric</th><th>last value</th></tr>{rows}</table>"


def _time(visits: list[Visit]) -> str:
    if not visits:
        return "<p>No phase has ended yet.</p>"
    rows = "".join(f'<tr><td>{html.escape(phase)}</td><td class="number">{seconds:.2f} s</td>'
                   f'<td class="number">{share:.0f}%</td></tr>'
                   for phase, seconds, share in shares(seconds_per_phase(visits)))
    return (f"{svg_timeline(visits)}\n<table><tr><th>phase</th><th>time</th><th>share</th></tr>{rows}</table>")


def _graph(folder: RunFolder, visits: list[Visit]) -> str:
    from phasetrain import render
    if not folder.graph_file.is_file():
        return "<p>The run has no graph.json (it stopped before its setup finished).</p>"
    graph, phase = render.GraphView.read(folder.graph_file), folder.position()[0]
    highlight = phase or FIRST
    if phase == "done":
        said = "The run is finished: <b>done</b> is highlighted."
    elif phase is None:
        said = f"The run has no checkpoint yet: a resume starts it from <b>{FIRST}</b>, which is highlighted."
    else:
        said = (f"Highlighted: <b>{html.escape(phase)}</b>, the phase of the run's latest checkpoint, where "
                "'phasetrain resume' continues it.")
    ended = [visit for visit in visits if visit.phase != "done"]
    if phase != "done" and ended:
        said += f" The last phase that ended: {html.escape(ended[-1].phase)} of epoch {ended[-1].epoch}."
    try:
        svg = render.render(graph, "svg", highlight)
    except PhasetrainError as exc:  # no Graphviz: the Mermaid text still says it all
        return (f"<p>{said}</p><p>{html.escape(str(exc))}. The graph in Mermaid:</p>"
                f"<pre>{html.escape(str(render.render(graph, 'mermaid', highlight)))}</pre>")
    text = svg.decode() if isinstance(svg, bytes) else svg
    return f"<p>{said}</p>\n" + text[text.index("<svg"):]


def _checkpoints(folder: RunFolder, policy: dict[str, Any]) -> str:
    latest = read_latest(folder.checkpoints)
    monitor, mode = policy.get("monitor", "eval/loss"), policy.get("mode", "min")
    summaries = [(checkpoint.name, read_summary(checkpoint)) for checkpoint in sorted(folder.checkpoints.glob("epoch*"))]
    if not summaries:
        return "<p>No checkpoint is kept.</p>"
    # Ranked as the run's retention ranks them, so the one marked best is the one in best.safetensors.
    ranked = best_first([(s.monitor, name) for name, s in summaries if s is not None and s.monitor is not None], mode)
    best = ranked[0] if ranked else None
    lines = []
    for name, saved in summaries:
        notes = [note for note, holds in (("latest", latest is not None and latest.name == name),
                                          (f"best by {monitor} ({mode})", name == best)) if holds]
        where = (f"<td>{saved.phase}</td><td class=\"number\">{saved.epoch}</td><td class=\"number\">{saved.step}</td>"
                 if saved else '<td>unreadable</td><td></td><td></td>')
        shown = f"{saved.monitor:.6g}" if saved and saved.monitor is not None else "not measured"
        lines.append(f'<tr{" class=best" if name == best else ""}><td>{html.escape(name)}</td>{where}'
                     f'<td class="number">{shown}</td><td>{", ".join(notes)}</td></tr>')
    exported = (f"<p>The best checkpoint's weights are also in {folder.best_weights.name}.</p>"
                if folder.best_weights.is_file() else "")
    return (f"<table><tr><th>checkpoint</th><th>phase</th><th>epoch</th><th>step</th><th>{html.escape(monitor)}</th>"
            f"<th></th></tr>{''.join(lines)}</table>{exported}")


# ---- inline SVG -----------------------------------------------------------------------------------
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 900, 230, 64, 210, 24, 40


def svg_chart(panel: Panel) -> str:
    """One panel's curves as an SVG line chart: x the optimizer step, y the panel's unit, legend on the right.
    A non-finite value breaks its curve and is marked with a cross at the chart's top edge."""
    points = [point for series in panel.series for point in series.points]
    x_low, x_high = _span([x for x, _ in points])
    y_low, y_high = _span([y for _, y in points if math.isfinite(y)] or [0.0, 1.0], pad=0.05)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x_at(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def y_at(y: float) -> float:
        return TOP + (y_high - y) / (y_high - y_low) * plot_h

    parts = [_axes(x_low, x_high, y_low, y_high, x_at, y_at, "optimizer step", panel.unit)]
    for index, series in enumerate(panel.series):
        colour, name = series.colour, html.escape(series.name)
        width, opacity = ("1", "0.5") if series.per_step else ("2", "1")
        for segment in _finite_runs(_thinned(series.points)):
            path = " ".join(f"{x_at(x):.1f},{y_at(y):.1f}" for x, y in segment)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{width}" opacity="{opacity}" '
                         f'points="{path}"><title>{name}</title></polyline>')
        if not series.per_step:
            parts += [f'<circle cx="{x_at(x):.1f}" cy="{y_at(y):.1f}" r="2.6" fill="{colour}">'
                      f"<title>{name} at step {x}: {y:.6g}</title></circle>" for x, y in series.points if math.isfinite(y)]
        parts += [f'<text x="{x_at(x):.1f}" y="{TOP + 4}" text-anchor="middle" fill="{colour}" font-size="13">×'
                  f"<title>{name} at step {x}: not finite (NaN or infinity)</title></text>"
                  for x, y in series.points if not math.isfinite(y)]
        legend_y = TOP + 14 + 16 * index
        parts.append(f'<line x1="{WIDTH - RIGHT + 14}" y1="{legend_y - 4}" x2="{WIDTH - RIGHT + 34}" y2="{legend_y - 4}" '
                     f'stroke="{colour}" stroke-width="{width}" opacity="{opacity}"/>'
                     f'<text x="{WIDTH - RIGHT + 40}" y="{legend_y}">{html.escape(series.name)}</text>')
    return _svg(f"curves: {panel.unit}", parts)


def svg_timeline(visits: list[Visit]) -> str:
    """Each phase visit as a bar in its phase's row, x the seconds since the run's first visit started."""
    colours = phase_colours(visits)
    phases = list(colours)
    end = max(visit.start + visit.seconds for visit in visits)
    row_h, top = 22, TOP
    height = top + row_h * len(phases) + BOTTOM
    plot_w = WIDTH - LEFT - RIGHT + 80

    def x_at(seconds: float) -> float:
        return LEFT + 40 + seconds / (end or 1.0) * plot_w

    parts = []
    for row, phase in enumerate(phases):
        y = top + row * row_h
        colour = colours[phase]
        parts.append(f'<text x="{LEFT + 34}" y="{y + 15}" text-anchor="end">{html.escape(phase)}</text>')
        parts += [f'<rect x="{x_at(v.start):.1f}" y="{y + 3}" width="{max(v.seconds / (end or 1.0) * plot_w, 1):.1f}" '
                  f'height="{row_h - 6}" fill="{colour}"><title>{html.escape(phase)}, epoch {v.epoch}: '
                  f"{v.seconds:.3f} s</title></rect>" for v in visits if v.phase == phase]
    base = top + row_h * len(phases)
    parts.append(f'<line x1="{x_at(0):.1f}" y1="{base}" x2="{x_at(end):.1f}" y2="{base}" stroke="#888"/>')
    for tick in _ticks(0.0, end):
        parts.append(f'<text x="{x_at(tick):.1f}" y="{base + 16}" text-anchor="middle">{tick:.3g}</text>')
    parts.append(f'<text x="{x_at(end / 2):.1f}" y="{base + 34}" text-anchor="middle">seconds since the run '
                 "started</text>")
    return _svg("phase timeline", parts, height)


def _svg(title: str, parts: list[str], height: int = HEIGHT) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
            f'font-family="Helvetica, Arial, sans-serif" font-size="11" role="img" aria-label="{html.escape(title)}">'
            f"<title>{html.escape(title)}</title>{''.join(parts)}</svg>")


def _axes(x_low: float, x_high: float, y_low: float, y_high: float, x_at: Any, y_at: Any, x_label: str,
          y_label: str) -> str:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" fill="none" stroke="#888"/>']
    for tick in _ticks(y_low, y_high):
        y = y_at(tick)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_number(tick)}</text>')
    for tick in _ticks(x_low, x_high):
        x = x_at(tick)
        parts.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{tick:.6g}</text>')
    parts.append(f'<text x="{(LEFT + right) / 2}" y="{HEIGHT - 6}" text-anchor="middle">{x_label}</text>'
                 f'<text x="14" y="{(TOP + bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(TOP + bottom) / 2})">{html.escape(y_label)}</text>')
    return "".join(parts)


def _thinned(points: list[tuple[int, float]], most: int = 2000) -> list[tuple[int, float]]:
    """At most about ``most`` points of a long curve (every k-th, the last kept): a page stays small."""
    if len(points) <= most:
        return points
    thinned = points[:: -(-len(points) // most)]
    return thinned if thinned[-1] == points[-1] else [*thinned, points[-1]]


def _finite_runs(points: list[tuple[int, float]]) -> list[list[tuple[int, float]]]:
    """The stretches of a curve between its non-finite values."""
    runs: list[list[tuple[int, float]]] = [[]]
    for x, y in points:
        if math.isfinite(y):
            runs[-1].append((x, y))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _span(values: list[float], pad: float = 0.0) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high == low:
        margin = abs(low) * 0.1 or 1.0
        return low - margin, high + margin
    margin = (high - low) * pad
    return low - margin, high + margin


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values (1, 2, 2.5 or 5 times a power of ten apart) from ``low`` to ``high``, about ``count`` of them."""
    if high <= low:
        return [low]
    rough = (high - low) / (count - 1)
    power = 10 ** math.floor(math.log10(rough))
    step = next(power * factor for factor in (1, 2, 2.5, 5, 10) if power * factor >= rough)
    first = math.ceil(low / step - 1e-9) * step
    return [first + step * index for index in range(int((high - first) / step + 1e-9) + 1)]

