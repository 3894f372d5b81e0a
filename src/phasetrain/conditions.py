"""Conditions on graph edges: named predicates over the run state, composable with ``&``, ``|`` and ``~``.

A condition sees only the ``RunState`` (epoch, optimizer step, stop request, ...), never the trainer, so
``phasetrain plan`` can evaluate it on a simulated run. Each carries a label, so a rendered graph shows
why an edge is taken (``eval_due``, ``every 2 epochs``).
"""
from __future__ import annotations

from collections.abc import Callable

from phasetrain.errors import ConfigError
from phasetrain.state import RunState


class Condition:
    """A labelled predicate ``RunState -> bool``.

    Example::

        when = every_n_epochs(2) & ~on_last_epoch()
        when.label  # 'every 2 epochs and not last epoch'
        Condition(lambda state: state.optimizer_step > 500, "after step 500")
    """

    def __init__(self, predicate: Callable[[RunState], bool], label: str) -> None:
        self.predicate = predicate
        self.label = label

    def __call__(self, state: RunState) -> bool:
        return bool(self.predicate(state))

    def __and__(self, other: Condition) -> Condition:
        return Condition(lambda s: self(s) and other(s), f"{self.label} and {other.label}")

    def __or__(self, other: Condition) -> Condition:
        return Condition(lambda s: self(s) or other(s), f"({self.label} or {other.label})")

    def __invert__(self) -> Condition:
        return Condition(lambda s: not self(s), f"not {self.label}")

    def __repr__(self) -> str:
        return f"Condition({self.label!r})"


def every_n_epochs(n: int) -> Condition:
    """True after epochs n, 2n, 3n, ..."""
    _check_positive(n, "every_n_epochs")
    return Condition(lambda s: s.epoch % n == 0, f"every {n} epochs" if n > 1 else "every epoch")


def every_n_steps(n: int) -> Condition:
    """True after an epoch during which the optimizer step count reached a multiple of n.

    Phases run between epochs, so "every 100 steps" means: the most recent train epoch reached or
    passed step 100, 200, ... (counted over the whole run).
    """
    _check_positive(n, "every_n_steps")
    return Condition(lambda s: s.optimizer_step // n > s.epoch_start_step // n, f"every {n} steps")


def on_epoch(n: int) -> Condition:
    """True once, after epoch n."""
    return Condition(lambda s: s.epoch == n, f"epoch {n}")


def on_last_epoch() -> Condition:
    """True once the last configured epoch has been trained."""
    return Condition(lambda s: s.is_last_epoch, "last epoch")


def eval_due(every: int, has_eval_data: bool) -> Condition:
    """Eval data exists and the epoch is a multiple of ``every`` (``train.eval_every``) or the last one."""
    return Condition(lambda s: has_eval_data and (s.epoch % every == 0 or s.is_last_epoch), "eval_due")


def checkpoint_due(every: int) -> Condition:
    """``every`` (``checkpoint.every_epochs``) > 0 and the epoch is a multiple of it or the last one."""
    return Condition(lambda s: every > 0 and (s.epoch % every == 0 or s.is_last_epoch), "checkpoint_due")


def run_finished() -> Condition:
    """The last epoch is done or something asked the run to stop."""
    return Condition(lambda s: s.finished, "finished")


def condition_from_config(spec: object, where: str = "when") -> Condition:
    """Build a condition from config data: ``{every_n_epochs: 2}``, ``{every_n_steps: 100}``,
    ``{on_last_epoch: true}``, ``{all: [...]}``, ``{any: [...]}``, ``{not: {...}}`` (nested freely)."""
    known = "every_n_epochs, every_n_steps, on_epoch, on_last_epoch, all, any, not"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected a mapping with one key ({known}), got {spec!r}")
    (key, value), = spec.items()
    if key in _COUNTED:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}.{key}: expected a whole number >= 1, got {value!r}")
        return _COUNTED[key](value)
    if key == "on_last_epoch":
        return on_last_epoch() if value else ~on_last_epoch()
    if key in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}.{key}: expected a non-empty list of conditions, got {value!r}")
        parts = [condition_from_config(v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
        combined = parts[0]
        for part in parts[1:]:
            combined = combined & part if key == "all" else combined | part
        return combined
    if key == "not":
        return ~condition_from_config(value, f"{where}.not")
    raise ConfigError(f"{where}: unknown condition {key!r}; expected one of: {known}")


_COUNTED: dict[str, Callable[[int], Condition]] = {
    "every_n_epochs": every_n_epochs, "every_n_steps": every_n_steps, "on_epoch": on_epoch}


def _check_positive(n: int, name: str) -> None:
    if n < 1:
        raise ValueError(f"{name} needs n >= 1, got {n}")
