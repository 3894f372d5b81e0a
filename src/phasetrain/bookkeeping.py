"""The trainer's own reactions to records. They are callbacks like any other (side effects bound to hooks,
not code inside ``log()``), but the trainer adds them itself, after every user callback, and a
``default_callbacks()`` override or a replaced default cannot drop them.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from phasetrain.callbacks import Callback
from phasetrain.state import RunState

if TYPE_CHECKING:
    from phasetrain.trainer import Trainer


class MonitorValue(Callback):
    """The latest value of ``checkpoint.monitor`` and the (epoch, step) it was measured at.

    ``keep_best`` ranks a checkpoint only when the value was measured on the weights being saved (no
    optimizer step since), so a mid-epoch checkpoint is never ranked by an older evaluation.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.value: float | None = None
        self.measured_at: tuple[int, int] | None = None

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["kind"] == "epoch" and self.monitor in record:
            self.value, self.measured_at = float(record[self.monitor]), (record["epoch"], record["step"])

    def value_now(self, state: RunState) -> float | None:
        """The value if it was measured at the run's current epoch and optimizer step, else None."""
        current = self.measured_at == (state.epoch, state.optimizer_step)
        # A NaN ranks nowhere (it would sort as the best) and is not JSON: it counts as not measured.
        return self.value if current and self.value is not None and math.isfinite(self.value) else None

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "measured_at": self.measured_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]
        at = state["measured_at"]
        self.measured_at = None if at is None else (int(at[0]), int(at[1]))


class PlateauScheduler(Callback):
    """Steps a ``ReduceLROnPlateau`` scheduler on ``checkpoint.monitor`` whenever an epoch record carries it."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau, monitor: str) -> None:
        self.scheduler, self.monitor = scheduler, monitor

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["kind"] == "epoch" and self.monitor in record:
            self.scheduler.step(record[self.monitor])


class EpochScheduler(Callback):
    """Steps a scheduler with ``interval: epoch`` after each train epoch's record, so the record's
    ``train/lr`` is the rate the epoch trained with. A ``train_epoch`` of your own needs no call for it."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["kind"] == "epoch" and "train/loss" in record:
            self.scheduler.step()


def scheduler_stepping(scheduler: Any, spec: Any) -> str:
    """When the run steps its scheduler, decided once: ``"step"`` (``scheduler_step()`` after every optimizer
    step), ``"epoch"`` (``EpochScheduler``), ``"plateau"`` (``PlateauScheduler``) or ``"none"``. A scheduler
    that does not come from the config (an overridden ``create_scheduler``) steps per optimizer step."""
    if scheduler is None:
        return "none"
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return "plateau"
    return spec.interval if spec is not None else "step"


def bookkeeping_callbacks(monitor: MonitorValue, scheduler: Any, stepping: str) -> list[Callback]:
    """The trainer's own callbacks: the monitored value, and what steps a scheduler that does not step per
    optimizer step (``stepping`` from ``scheduler_stepping``)."""
    if stepping == "plateau":
        return [monitor, PlateauScheduler(scheduler, monitor.monitor)]
    return [monitor, *([EpochScheduler(scheduler)] if stepping == "epoch" else [])]


def warn_if_never_logged(monitor: str, record_prefixes: Iterable[str | None], metric_names: Iterable[str]) -> None:
    """Warn when ``checkpoint.monitor`` is no metric this run's phases log (keep_best would keep nothing)."""
    names = ["loss", *metric_names]
    known = {"train/loss", "train/lr"} | {f"{prefix}/{name}" for prefix in record_prefixes
                                          if prefix and prefix != "train" for name in names}
    if monitor not in known:
        warnings.warn(f"checkpoint.monitor {monitor!r} is not a metric this run logs ({', '.join(sorted(known))}); "
                      "keep_best keeps nothing unless a callback logs it", stacklevel=4)
