"""pytorch-accelerated's run history (``pytorch_accelerated.tracking``): metric values by name, and the epoch.

The same methods and behaviour, with two flaws fixed: ``get_latest_metric`` of an unknown name no longer
inserts the name (after which every later ``get_metric_names`` loop failed on it), and the history is
part of phasetrain's checkpoints (``state_dict``), so a resumed run goes on with the same history.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any


class RunHistory(ABC):
    """The interface the compat ``Trainer`` and its callbacks use; subclass it to send metrics elsewhere."""

    @abstractmethod
    def get_metric_names(self) -> Iterable[str]: ...

    @abstractmethod
    def get_metric_values(self, metric_name: str) -> list[Any]: ...

    @abstractmethod
    def get_latest_metric(self, metric_name: str) -> Any: ...

    @abstractmethod
    def update_metric(self, metric_name: str, metric_value: Any) -> None: ...

    @abstractmethod
    def set_metric_name_prefix(self, prefix: str = "") -> None: ...

    @property
    @abstractmethod
    def metric_name_prefix(self) -> str: ...

    @abstractmethod
    def delete_metric(self, metric_name: str) -> None: ...

    @property
    @abstractmethod
    def current_epoch(self) -> int:
        """The epoch being trained, from 1; it moves on after each epoch's ``on_training_run_epoch_end``."""

    @abstractmethod
    def _increment_epoch(self) -> None: ...

    @abstractmethod
    def _set_epoch(self, epoch: int) -> None: ...

    @abstractmethod
    def reset(self) -> None:
        """Forget every metric; the epoch goes back to 1."""

    def state_dict(self) -> dict[str, Any]:
        """What a phasetrain checkpoint keeps of the history (plain numbers; a tensor value is kept as a float)."""
        return {"epoch": self.current_epoch,
                "metrics": {name: [_plain(v) for v in self.get_metric_values(name)] for name in self.get_metric_names()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        prefix = self.metric_name_prefix
        self.reset()
        self.set_metric_name_prefix("")  # the saved names carry their prefixes already
        for name, values in state["metrics"].items():
            for value in values:
                self.update_metric(name, value)
        self.set_metric_name_prefix(prefix)
        self._set_epoch(int(state["epoch"]))


class InMemoryRunHistory(RunHistory):
    """The default run history: lists of values in memory."""

    def __init__(self) -> None:
        self._current_epoch = 1
        self._metrics: dict[str, list[Any]] = {}
        self._prefix = ""

    def get_metric_names(self) -> set[str]:
        return set(self._metrics)

    def get_metric_values(self, metric_name: str) -> list[Any]:
        return list(self._metrics.get(metric_name, []))

    def get_latest_metric(self, metric_name: str) -> Any:
        values = self._metrics.get(metric_name)
        if not values:
            raise ValueError(f"No values have been recorded for the metric {metric_name}")
        return values[-1]

    def update_metric(self, metric_name: str, metric_value: Any) -> None:
        self._metrics.setdefault(f"{self._prefix}{metric_name}", []).append(metric_value)

    def set_metric_name_prefix(self, prefix: str = "") -> None:
        self._prefix = prefix

    @property
    def metric_name_prefix(self) -> str:
        return self._prefix

    def delete_metric(self, metric_name: str) -> None:
        self._metrics.pop(metric_name, None)

    @property
    def current_epoch(self) -> int:
        return self._current_epoch

    def _increment_epoch(self) -> None:
        self._current_epoch += 1

    def _set_epoch(self, epoch: int) -> None:
        self._current_epoch = epoch

    def reset(self) -> None:
        self._current_epoch = 1
        self._metrics = {}


class LossTracker:
    """A sample-weighted running mean of batch losses (pytorch-accelerated's helper, for code that uses it)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_value = 0.0
        self._average = 0.0
        self.total_loss = 0.0
        self.running_count = 0

    def update(self, loss_batch_value: float, batch_size: int = 1) -> None:
        self.loss_value = loss_batch_value
        self.total_loss += loss_batch_value * batch_size
        self.running_count += batch_size
        self._average = self.total_loss / self.running_count

    @property
    def average(self) -> float:
        return self._average


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value
