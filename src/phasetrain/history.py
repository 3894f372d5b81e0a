"""RunHistory: every epoch-level metric of a run, with pytorch-accelerated's method names."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class RunHistory:
    """Per-metric lists of values, one entry per logged epoch.

    Example::

        history.get_latest_metric("eval/accuracy")   # 0.97
        history.get_metric_values("train/loss")      # [1.2, 0.4, ...]
    """

    def __init__(self) -> None:
        self._metrics: dict[str, list[float]] = {}

    def update_metric(self, metric_name: str, metric_value: float) -> None:
        self._metrics.setdefault(metric_name, []).append(float(metric_value))


    def get_metric_names(self) -> set[str]:
        return set(self._metrics)

    def get_metric_values(self, metric_name: str) -> list[float]:
        if metric_name not in self._metrics:
            raise KeyError(f"no metric {metric_name!r} in the run history; known: {sorted(self._metrics)}")
        return list(self._metrics[metric_name])

    def get_latest_metric(self, metric_name: str) -> float:
        return self.get_metric_values(metric_name)[-1]

    def state_dict(self) -> dict[str, Any]:
        return {name: list(values) for name, values in self._metrics.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._metrics = {name: [float(v) for v in values] for name, values in state.items()}


def add_record(history: Any, record: Mapping[str, Any]) -> None:
    """Put the metrics of an epoch-level record (a ``metrics.jsonl`` line) into ``history``: a RunHistory, or
    any object with ``update_metric`` (what a ``create_run_history`` override may return). Other kinds of
    record hold none."""
    if record["kind"] == "epoch":
        for key, value in record.items():
            if "/" in key:
                history.update_metric(key, value)
