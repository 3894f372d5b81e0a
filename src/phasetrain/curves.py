"""A run folder's records as curves and a phase timeline: what ``phasetrain plot`` draws and
``phasetrain report`` shows. Reads ``metrics.jsonl`` only; imports no torch.

The x axis of every curve is the optimizer step, so the step records, the epoch records and the
evaluations of one run line up. Curves share a panel when they share a unit, which their names say:
``train/loss``, ``eval/loss`` and ``test/loss`` on one, ``eval/accuracy`` and ``test/accuracy`` on another.
"""
from __future__ import annotations

import difflib
import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import Any

from phasetrain.errors import RunDirError

#: The colours of the plot and the report: a panel's metrics, or the phases of the timeline, in order.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#9c755f", "#edc948")

#: The name of the throughput curve (from the records' ``time.samples_per_s``).
RATE = "train/samples/s"


@dataclass
class Series:
    name: str  # as in the records: "eval/loss"; step records' curves end in " (steps)"
    points: list[tuple[int, float]]  # (optimizer step, value)
    per_step: bool = False
    colour: str = PALETTE[0]  # a metric's step and epoch curves share it


@dataclass
class Panel:
    unit: str  # "loss", "accuracy", "lr", "samples/s"
    series: list[Series] = field(default_factory=list)


@dataclass
class Visit:
    phase: str
    epoch: int
    start: float  # seconds since the run's first visit started (a resumed run's downtime shows as a gap)
    seconds: float


@dataclass
class Curves:
    panels: list[Panel]
    visits: list[Visit]
    final: dict[str, float]  # each metric's last value


def read_records(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl``; a line a kill cut short (the last one) is skipped. A run
    folder (it has ``config.yaml``) without the file has logged nothing yet."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        if (run_dir / "config.yaml").is_file():
            return []
        raise RunDirError(f"{run_dir} is not a run folder (it has no config.yaml or metrics.jsonl): give the "
                          "folder of a run (its run_dir)")
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # a kill cut the last line short
                continue
            raise RunDirError(f"{path}, line {number}: not JSON; was the file written by phasetrain?") from None
        problem = _not_a_record(record)
        if problem:
            raise RunDirError(f"{path}, line {number}: not a phasetrain record ({problem}); was the file written "
                              "by phasetrain?")
        records.append(record)
    return records


def _not_a_record(record: Any) -> str | None:
    """What makes ``record`` no record phasetrain writes, or None."""
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not an object"
    for key, kind in (("phase", str), ("kind", str), ("step", int), ("epoch", int)):
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            return f"{key!r} is {record.get(key)!r}"
    times = record.get("time", {})
    if not isinstance(times, dict) or not all(_number(value) for value in times.values()):
        return f"'time' is {times!r}"
    if record["kind"] == "phase" and "time" in record and not {"start", "seconds"} <= times.keys():
        return "a phase record's time needs 'start' and 'seconds'"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def curves(records: list[dict[str, Any]], metrics: list[str] | None = None) -> Curves:
    """Panels of curves (only ``metrics``, if given: names as in the records) and the phase timeline."""
    epoch: dict[str, list[tuple[int, float]]] = {}
    step: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record["kind"] not in ("epoch", "step"):
            continue
        target = epoch if record["kind"] == "epoch" else step
        values = {key: value for key, value in record.items() if "/" in key}
        rate = record.get("time", {}).get("samples_per_s")
        if rate is not None:
            values[RATE] = rate
        for name, value in values.items():
            if value is None or _number(value):  # metrics.jsonl writes a NaN or infinity as null
                target.setdefault(name, []).append((record["step"], math.nan if value is None else float(value)))
    if metrics:
        unknown = sorted(set(metrics) - set(epoch) - set(step))
        if unknown:
            known = sorted(set(epoch) | set(step))
            close = difflib.get_close_matches(unknown[0], known, n=1)
            raise RunDirError(f"no metric {', '.join(unknown)} in the run's records"
                              f"{f' (did you mean {close[0]}?)' if close else ''}; it has {', '.join(known)}")
        epoch = {name: points for name, points in epoch.items() if name in metrics}
        step = {name: points for name, points in step.items() if name in metrics}
    panels: dict[str, Panel] = {}
    # Step curves first: thin, drawn under the epoch ones.
    every = [(name, points, True) for name, points in step.items()] + [(n, p, False) for n, p in epoch.items()]
    colours: dict[str, dict[str, str]] = {}  # per panel, per metric
    for name, points, per_step in every:
        unit = "samples/s" if name == RATE else name.rsplit("/", 1)[-1]
        label = f"{name} (steps)" if per_step else name
        in_panel = colours.setdefault(unit, {})
        colour = in_panel.setdefault(name, PALETTE[len(in_panel) % len(PALETTE)])
        panels.setdefault(unit, Panel(unit)).series.append(Series(label, points, per_step, colour))
    final = {name: points[-1][1] for name, points in epoch.items() if name != RATE}  # NaN too: it is the last
    return Curves(sorted(panels.values(), key=_panel_order), visits(records), final)


def _panel_order(panel: Panel) -> tuple[int, str]:
    first = {"loss": 0, "lr": 8, "samples/s": 9}
    return first.get(panel.unit, 1), panel.unit


def visits(records: list[dict[str, Any]]) -> list[Visit]:
    """Every phase visit the records hold, in order, its start relative to the first one's."""
    timed = [record for record in records if record["kind"] == "phase" and "time" in record]
    if not timed:
        return []
    origin = timed[0]["time"]["start"]
    return [Visit(r["phase"], int(r["epoch"]), r["time"]["start"] - origin, r["time"]["seconds"]) for r in timed]


def seconds_per_phase(timeline: list[Visit]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for visit in timeline:
        totals[visit.phase] = totals.get(visit.phase, 0.0) + visit.seconds
    return totals


def phase_colours(timeline: list[Visit]) -> dict[str, str]:
    """Each phase's colour, in the order the phases first ran."""
    phases = dict.fromkeys(visit.phase for visit in timeline)
    return {phase: PALETTE[index % len(PALETTE)] for index, phase in enumerate(phases)}
