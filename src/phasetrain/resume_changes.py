"""What a resumed run may change in its config, and how a change is applied.

A checkpoint restores the optimizer's state, learning rate included, so a config edited between a
stop and its resume would be ignored silently if nothing else happened. The rule instead: a change
the saved state can carry forward is applied and named in one warning; any other change is refused
before anything runs, with what to do. Never a warning that says one thing while the run does another.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from phasetrain.errors import ConfigError

#: Dotted keys (or prefixes ending in ".") a resume may change.
APPLICABLE = ("train.epochs", "train.max_steps", "train.max_grad_value", "train.log_every_steps", "train.progress_bar", "train.num_workers",
              "train.eval_batch_size", "train.eval_every", "train.max_grad_norm", "train.nonfinite_loss",
              "checkpoint.", "optimizer.args.", "metrics", "callbacks", "tracking")

#: Optimizer hyperparameters a scheduler may set every step (OneCycleLR and CyclicLR cycle the momentum too).
SCHEDULED = ("lr", "momentum", "betas")

#: Changes that cannot change the trained weights.
NO_EFFECT = ("train.log_every_steps", "train.progress_bar", "checkpoint.", "tracking")


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with the keys added since it was written filled in with their defaults: a key
    this phasetrain has and that config lacks is not a change (its default is what that run ran with)."""
    from phasetrain.config import RunConfig
    try:
        return RunConfig.from_dict(saved).to_dict()
    except ConfigError:  # a config this phasetrain no longer reads: compared as saved, changes are named
        return saved


def changed_keys(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (run_dir and overwrite do not change the run's result)."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in ("run_dir", "overwrite"):
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, f"{dotted}.")
        elif a != b:
            changed.append(dotted)
    return changed


def refuse_changes(saved: dict[str, Any], current: dict[str, Any], checkpoint: str, epoch: int, step: int,
                   scheduler_sized_by: Collection[str] = ()) -> None:
    """Raise a ConfigError naming the changes from ``saved`` to ``current`` that a resume cannot make;
    called before anything is loaded from the checkpoint (taken in ``epoch``, at optimizer ``step``)."""
    changed = changed_keys(saved, current)
    refused = [key for key in changed if not key.startswith(APPLICABLE)]
    if refused:
        raise ConfigError(
            f"the config differs from checkpoint {checkpoint}'s in {_show(refused, saved, current)}, which a resumed "
            "run cannot change (the saved state was made with the old values); restore the old values, or start a "
            "new run with another run_dir")
    scheduled = [key for key in changed if key in {f"optimizer.args.{name}" for name in SCHEDULED}]
    if scheduled and current.get("scheduler"):
        raise ConfigError(f"{', '.join(scheduled)} changed since checkpoint {checkpoint}, but the scheduler "
                          f"{current['scheduler']['target']} sets it from its own state, so the change would not "
                          "hold; restore the old value, or start a new run with the schedule you want")
    epochs = current["train"]["epochs"]
    if epochs < epoch:
        raise ConfigError(f"train.epochs={epochs}, but checkpoint {checkpoint} is in epoch {epoch}: "
                          f"give train.epochs >= {epoch}")
    max_steps = current["train"].get("max_steps")
    if max_steps is not None and max_steps < step:
        raise ConfigError(f"train.max_steps={max_steps}, but checkpoint {checkpoint} is at optimizer step {step}: "
                          f"give train.max_steps >= {step}")
    _refuse_a_stretched_schedule(changed, saved, current, checkpoint, scheduler_sized_by)


def _refuse_a_stretched_schedule(changed: list[str], saved: dict[str, Any], current: dict[str, Any],
                                 checkpoint: str, used: Collection[str]) -> None:
    """A scheduler sized by ``"{total_steps}"`` or ``"{epochs}"`` (``used``) keeps the length it was built
    with: its saved state overrides the new one (a OneCycleLR then fails past its end, a cosine stays at
    its floor)."""
    lengths = [key for key in changed if key in ("train.epochs", "train.max_steps")]
    if lengths and used:
        raise ConfigError(f"{_show(lengths, saved, current)} changed since checkpoint {checkpoint}, but the scheduler "
                          f"was sized by {', '.join(f'{{{name}}}' for name in sorted(used))} for the old length, and "
                          "its saved state keeps that length; restore the old value, or start a new run")


def apply_changes(saved: dict[str, Any], current: dict[str, Any], optimizer: Any) -> str | None:
    """Apply the changes ``refuse_changes`` allowed to the restored ``optimizer`` (the epochs come with the
    run state); returns the warning that names every change, or None when nothing changed."""
    changed = changed_keys(saved, current)
    if not changed:
        return None
    for key in changed:
        if key.startswith("optimizer.args."):
            _set_hyperparameter(optimizer, key.removeprefix("optimizer.args."), _get(current, key))
    message = f"resuming with config changes, applied from here on: {_show(changed, saved, current)}"
    if not all(key.startswith(NO_EFFECT) for key in changed):
        message += "; the result may no longer be bitwise the uninterrupted run's"
    return message


def _set_hyperparameter(optimizer: Any, name: str, value: Any) -> None:
    """Set ``name`` in every parameter group (as the optimizer's constructor would have)."""
    groups = optimizer.param_groups
    if "." in name or any(name not in group for group in groups):
        raise ConfigError(f"optimizer.args.{name} changed, but it is not a hyperparameter "
                          f"{type(optimizer).__name__} keeps per parameter group, so a resume cannot apply it; "
                          "restore the old value or start a new run")
    for group in groups:
        group[name] = tuple(value) if isinstance(group[name], tuple) else value


def _get(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _show(keys: list[str], saved: dict[str, Any], current: dict[str, Any]) -> str:
    def value(config: dict[str, Any], key: str) -> str:
        got = _get(config, key)
        return "(not set)" if got is None else repr(got)
    return ", ".join(f"{key} {value(saved, key)} -> {value(current, key)}" for key in keys)


def refuse_other_process_count(checkpoint: str, saved_processes: int, processes: int, scheduler_args: Any) -> None:
    """A checkpoint of another process count resumes (re-sharded, not bitwise), unless the scheduler's args
    hold a placeholder that the process count changes: its restored state would keep the old values."""
    from phasetrain.schedulers import PROCESS_PLACEHOLDERS, placeholders_in
    used = sorted(placeholders_in(scheduler_args) & set(PROCESS_PLACEHOLDERS)) if scheduler_args else []
    if saved_processes != processes and used:
        braced = ", ".join(f"{{{name}}}" for name in used)
        raise ConfigError(
            f"checkpoint {checkpoint} was written by {saved_processes} process(es) and this run has {processes}: "
            f"the scheduler's args use {braced}, which the process count changes, and its restored state keeps "
            f"the old values; resume with {saved_processes} process(es), or give the scheduler fixed numbers "
            "from the start")
