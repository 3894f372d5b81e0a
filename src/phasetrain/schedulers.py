"""Learning-rate schedules that know the run's length, and the placeholders that tell them.

A scheduler's arguments often depend on numbers only the run knows (a OneCycleLR's ``total_steps``
changes with the batch size, the number of processes and ``grad_accum_steps``). Rather than make the
user work them out, a scheduler arg may be a placeholder, replaced by ``resolve_run_length`` once the
data is sharded::

    scheduler: {target: warmup_cosine, args: {warmup_steps: 20, total_steps: "{total_steps}"}}
    scheduler: {target: "torch.optim.lr_scheduler:OneCycleLR", args: {max_lr: 0.01, total_steps: "{total_steps}"}}
    scheduler: {target: "torch.optim.lr_scheduler:MultiStepLR", args: {milestones: ["{steps_per_epoch} * 3"]}}

Two forms only, ``"{name}"`` and ``"{name} * N"`` with a whole number N: enough for "the whole run"
and "N epochs"; anything richer belongs in a scheduler function of your own.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from phasetrain.errors import ConfigError


@dataclass(frozen=True)
class RunLength:
    """What a scheduler may need to know about the run's length, the same on every process."""

    epochs: int                   # train epochs of the run
    steps_per_epoch: int | None   # optimizer updates per epoch on each process (None: an iterable dataset without a length)
    total_steps: int | None       # optimizer updates in the whole run (train.max_steps when that ends it sooner)
    batch_size: int               # per process
    eval_batch_size: int          # per process
    num_processes: int
    grad_accum_steps: int


#: The names a scheduler arg may hold in braces: the fields of RunLength.
PLACEHOLDERS = tuple(field.name for field in dataclasses.fields(RunLength))

#: The placeholders whose value follows train.epochs or train.max_steps (a resume may change those).
LENGTH_PLACEHOLDERS = ("epochs", "total_steps")

#: The placeholders whose value follows the number of processes (a resume may change that).
PROCESS_PLACEHOLDERS = ("steps_per_epoch", "total_steps", "num_processes")

_PLACEHOLDER = re.compile(r"\{\s*(?P<name>\w*)\s*\}(?:\s*\*\s*(?P<times>\d+))?")
_BRACED_WORD = re.compile(r"\{\s*\w*\s*\}")


def resolve_run_length(args: dict[str, Any], length: RunLength, what: str) -> dict[str, Any]:
    """``args`` with each placeholder string replaced by its number, in nested lists and mappings too.

    A placeholder is a string ``"{name}"`` or ``"{name} * N"`` (N a whole number), ``name`` one of
    ``PLACEHOLDERS``. ``what`` says where ``args`` sit in the config (``"scheduler.args"``); a ConfigError
    names the arg (``scheduler.args.total_steps``) for an unknown name, a number this run does not know
    (the steps of an iterable dataset without a length) or braces in any other form.

    Example, for a run of 30 epochs of 10 steps::

        resolve_run_length({"total_steps": "{total_steps}", "warmup_steps": "{steps_per_epoch} * 2"}, length,
                           "scheduler.args")  # {"total_steps": 300, "warmup_steps": 20}
    """
    return {key: _resolve(value, length, f"{what}.{key}") for key, value in args.items()}


def _resolve(value: Any, length: RunLength, where: str) -> Any:
    if isinstance(value, dict) and len(value) == 1 and next(iter(value.values())) is None:
        # `T_max={total_steps}` unquoted on a command line (or in YAML) reads as the mapping {total_steps: null}
        (name,) = value
        raise ConfigError(f"{where}: {{{name}}} was read as a mapping, not text: quote it, as in "
                          f"'{where}=\"{{{name}}}\"' (YAML reads unquoted braces as a mapping)")
    if isinstance(value, dict):
        return {key: _resolve(item, length, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_resolve(item, length, f"{where}[{i}]") for i, item in enumerate(value))
    if not isinstance(value, str) or not _BRACED_WORD.search(value):
        return value
    match = _PLACEHOLDER.fullmatch(value.strip())
    if match is None:
        raise ConfigError(f"{where}: {value!r} is not a placeholder phasetrain reads: write '{{name}}' or "
                          f"'{{name}} * N' with a whole number N ({_known()})")
    name = match["name"]
    if name not in PLACEHOLDERS:
        close = difflib.get_close_matches(name, PLACEHOLDERS, n=1)
        hint = f", did you mean '{{{close[0]}}}'?" if close else ""
        raise ConfigError(f"{where}: unknown placeholder '{{{name}}}'{hint} ({_known()})")
    number = getattr(length, name)
    if number is None:
        remedy = "set train.max_steps or write the number" if name == "total_steps" else "write the number"
        raise ConfigError(f"{where}: {value!r} has no value in this run: the train dataset has no length (an "
                          f"IterableDataset without __len__), so its steps are not known ahead; {remedy} instead")
    times = int(match["times"] or 1)
    if times < 1:
        raise ConfigError(f"{where}: {value!r} multiplies by {times}: the factor must be a whole number >= 1")
    return number * times


def placeholders_in(args: Any) -> set[str]:
    """The placeholder names ``args`` uses, at any depth (``{"T_max": "{total_steps}"}`` -> ``{"total_steps"}``)."""
    if isinstance(args, dict):
        return set().union(*(placeholders_in(value) for value in args.values()))
    if isinstance(args, list | tuple):
        return set().union(*(placeholders_in(value) for value in args))
    match = _PLACEHOLDER.fullmatch(args.strip()) if isinstance(args, str) else None
    return {match["name"]} if match else set()


def _known() -> str:
    return "known: " + ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)


# ---- warmup then cosine ------------------------------------------------------------------------------
def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> LRScheduler:
    """Linear warmup to each group's lr over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``
    at ``total_steps``; stepped once per optimizer update (``interval: step``).

    After ``s`` updates (the lr the next update uses; ``s = 0`` before the first one), each group's lr is
    ``lr * f(s)`` with, for ``W = warmup_steps``, ``T = total_steps``, ``r = min_lr_ratio``::

        f(s) = (s + 1) / (W + 1)                                  for s < W
        f(s) = r + (1 - r) * (1 + cos(pi * (s - W) / (T - W))) / 2   for W <= s <= T
        f(s) = r                                                  for s > T

    The warmup starts at ``lr / (W + 1)``, not 0 (an update at lr 0 would be wasted), and reaches ``lr``
    at ``s = W``, where the cosine starts; the ``T``-th update leaves the lr at ``r * lr``. With
    ``W = 0`` it is a plain cosine from ``lr``.

    Example (config)::

        scheduler: {target: warmup_cosine, args: {warmup_steps: 20, total_steps: "{total_steps}"}}
    """
    return WarmupCosine(optimizer, warmup_steps, total_steps, min_lr_ratio)


class WarmupCosine(LRScheduler):
    """The schedule of ``warmup_cosine``; its state is plain numbers, so a checkpoint restores it."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.0) -> None:
        _whole("warmup_steps", warmup_steps, minimum=0)
        _whole("total_steps", total_steps, minimum=1)
        if total_steps <= warmup_steps:
            raise ConfigError(f"warmup_cosine: total_steps ({total_steps}) must be greater than warmup_steps "
                              f"({warmup_steps}), leaving the cosine at least one step: lower warmup_steps "
                              "or train for longer")
        if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, int | float) \
                or not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"warmup_cosine: min_lr_ratio must be a number from 0 to 1 (the final lr as a "
                              f"fraction of each group's lr), got {min_lr_ratio!r}")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, float(min_lr_ratio)
        super().__init__(optimizer)  # sets each group's lr to lr * f(0)

    def factor(self, step: int) -> float:
        """``f(step)``: the lr after ``step`` updates, as a fraction of each group's initial lr."""
        warmup, total, ratio = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(step - warmup, total - warmup) / (total - warmup)
        return ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float | torch.Tensor]:  # a group's lr may be a tensor (torch allows it)
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]


def _whole(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"warmup_cosine: {name} must be a whole number >= {minimum}, got {value!r}")
