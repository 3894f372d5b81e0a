"""LR schedules: warmup_cosine against its closed form, the run-length placeholders, the pytorch-accelerated
CosineLrScheduler against pytorch-accelerated's own, and the lr a real run steps through."""
from __future__ import annotations

import io
import math
import pathlib
from typing import Any

import pytest
import torch

from phasetrain import Callback, Trainer
from phasetrain.errors import ConfigError
from phasetrain.schedulers import PLACEHOLDERS, RunLength, resolve_run_length, warmup_cosine
from tests.conftest import digits_config


def optimizer(*lrs: float) -> torch.optim.Optimizer:
    """An SGD with one single-weight param group per lr: all a scheduler touches."""
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


def lrs_per_step(opt: torch.optim.Optimizer, scheduler: Any, steps: int) -> list[list[float]]:
    """Each group's lr before the first update and after each of ``steps`` updates."""
    seen = [[group["lr"] for group in opt.param_groups]]
    for _ in range(steps):
        opt.step()
        scheduler.step()
        seen.append([group["lr"] for group in opt.param_groups])
    return seen


def expected_factor(step: int, warmup: int, total: int, ratio: float) -> float:
    """warmup_cosine's documented closed form, written out again: the lr after ``step`` updates / the lr."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= total:
        return ratio
    return ratio + (1 - ratio) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


# ---- warmup_cosine -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("warmup", "total", "ratio"), [(4, 13, 0.0), (0, 7, 0.1), (1, 2, 0.5)])
def test_warmup_cosine_follows_its_closed_form_at_every_step(warmup: int, total: int, ratio: float) -> None:
    opt = optimizer(0.1, 0.02)
    seen = lrs_per_step(opt, warmup_cosine(opt, warmup, total, ratio), total + 3)
    for step, lrs in enumerate(seen):
        f = expected_factor(step, warmup, total, ratio)
        assert lrs == pytest.approx([0.1 * f, 0.02 * f], rel=1e-12, abs=1e-15), step
    assert seen[warmup][0] == pytest.approx(0.1)  # the peak, reached exactly where the cosine starts
    assert seen[total][0] == pytest.approx(0.1 * ratio, abs=1e-15)  # the floor, after the last update


def test_warmup_cosine_resumes_from_a_saved_state_dict() -> None:
    opt = optimizer(0.1)
    whole = lrs_per_step(opt, warmup_cosine(opt, 3, 10, 0.1), 10)

    opt = optimizer(0.1)
    first = warmup_cosine(opt, 3, 10, 0.1)
    lrs_per_step(opt, first, 6)
    saved = io.BytesIO()
    torch.save({"scheduler": first.state_dict(), "optimizer": opt.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)  # how phasetrain reads checkpoints: plain data only

    opt = optimizer(0.1)
    opt.load_state_dict(state["optimizer"])
    resumed = warmup_cosine(opt, 3, 10, 0.1)
    resumed.load_state_dict(state["scheduler"])
    assert lrs_per_step(opt, resumed, 4)[1:] == whole[7:]


@pytest.mark.parametrize(("args", "says"), [
    ({"warmup_steps": -1, "total_steps": 10}, "warmup_cosine: warmup_steps must be a whole number >= 0, got -1"),
    ({"warmup_steps": 2.5, "total_steps": 10}, "warmup_steps must be a whole number >= 0, got 2.5"),
    ({"warmup_steps": 10, "total_steps": 10}, "total_steps (10) must be greater than warmup_steps (10)"),
    ({"warmup_steps": 0, "total_steps": "{total_steps}"}, "total_steps must be a whole number >= 1, got '{total_steps}'"),
    ({"warmup_steps": 0, "total_steps": 10, "min_lr_ratio": 1.5}, "min_lr_ratio must be a number from 0 to 1"),
])
def test_warmup_cosine_refuses_bad_arguments(args: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as error:
        warmup_cosine(optimizer(0.1), **args)
    assert says in str(error.value)


# ---- placeholders --------------------------------------------------------------------------------------
LENGTH = RunLength(epochs=3, steps_per_epoch=20, total_steps=60, batch_size=32, eval_batch_size=64,
                   num_processes=2, grad_accum_steps=1)


def test_placeholders_are_replaced_by_the_run_length_and_nothing_else() -> None:
    args = {"max_lr": 0.01, "total_steps": "{total_steps}", "warmup_steps": " {steps_per_epoch} * 2 ",
            "milestones": ["{steps_per_epoch}", "{steps_per_epoch}*2", 50], "anneal_strategy": "cos",
            "nested": {"epochs": "{epochs}"}}
    assert resolve_run_length(args, LENGTH, "scheduler.args") == {
        "max_lr": 0.01, "total_steps": 60, "warmup_steps": 40, "milestones": [20, 40, 50], "anneal_strategy": "cos",
        "nested": {"epochs": 3}}
    every = resolve_run_length({name: f"{{{name}}}" for name in PLACEHOLDERS}, LENGTH, "scheduler.args")
    assert every == {name: getattr(LENGTH, name) for name in PLACEHOLDERS}


@pytest.mark.parametrize(("value", "message"), [
    ("{total_step}", ("scheduler.args.total_steps: unknown placeholder '{total_step}', did you mean '{total_steps}'? "
                      "(known: {epochs}, {steps_per_epoch}, {total_steps}, {batch_size}, {eval_batch_size}, "
                      "{num_processes}, {grad_accum_steps})")),
    ("{total_steps} - 10", ("scheduler.args.total_steps: '{total_steps} - 10' is not a placeholder phasetrain reads: "
                            "write '{name}' or '{name} * N' with a whole number N (known: {epochs},")),
    ("{total_steps} * 0.5", "scheduler.args.total_steps: '{total_steps} * 0.5' is not a placeholder phasetrain reads"),
    (["{steps}"], "scheduler.args.total_steps[0]: unknown placeholder '{steps}'"),
])
def test_a_bad_placeholder_is_refused_in_one_line_naming_the_arg(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_run_length({"total_steps": value}, LENGTH, "scheduler.args")
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_the_steps_of_a_dataset_without_a_length_are_refused_not_guessed() -> None:
    unknown = RunLength(epochs=3, steps_per_epoch=None, total_steps=None, batch_size=32, eval_batch_size=32,
                        num_processes=1, grad_accum_steps=1)
    assert resolve_run_length({"epochs": "{epochs}"}, unknown, "scheduler.args") == {"epochs": 3}
    with pytest.raises(ConfigError) as error:
        resolve_run_length({"total_steps": "{total_steps}"}, unknown, "scheduler.args")
    assert str(error.value) == (
        "scheduler.args.total_steps: '{total_steps}' has no value in this run: the train dataset has no length "
        "(an IterableDataset without __len__), so its steps are not known ahead; set train.max_steps or write "
        "the number instead")
    with pytest.raises(ConfigError, match=r"^scheduler.args.warmup_steps: '\{steps_per_epoch\} \* 2' has no value "
                       r"in this run: .*; write the number instead$"):
        resolve_run_length({"warmup_steps": "{steps_per_epoch} * 2"}, unknown, "scheduler.args")


# ---- the lr of a real run ------------------------------------------------------------------------------
class LrRecorder(Callback):
    """The lr of the first param group after every optimizer step (the scheduler has stepped by then)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_step_end(self, trainer: Any, loss: torch.Tensor) -> None:
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])


def warmup_cosine_run(run_dir: pathlib.Path, grad_accum_steps: int) -> tuple[Trainer, LrRecorder]:
    """One epoch of digits with warmup_cosine over the whole run, as the config names it."""
    config = digits_config(run_dir, model={"args": {"hidden": 8}},
                           train={"epochs": 1, "grad_accum_steps": grad_accum_steps},
                           scheduler={"target": "warmup_cosine",
                                      "args": {"warmup_steps": 3, "total_steps": "{total_steps}",
                                               "min_lr_ratio": 0.1}})
    recorder = LrRecorder()
    trainer = Trainer(config, callbacks=[recorder])
    trainer.run()
    return trainer, recorder


def expected_run_lrs(steps: int) -> list[float]:
    """The lr after each of ``steps`` updates when the schedule spans exactly the run (AdamW lr 0.003)."""
    return [0.003 * expected_factor(step, 3, steps, 0.1) for step in range(1, steps + 1)]


@pytest.mark.parametrize(("grad_accum_steps", "steps"), [(1, 40), (2, 20)])
def test_a_run_steps_warmup_cosine_over_exactly_its_total_steps(tmp_path: pathlib.Path, grad_accum_steps: int,
                                                                 steps: int) -> None:
    # 1259 train samples, 32 a batch: 40 batches, so 40 updates, or 20 with two micro-batches each.
    trainer, recorder = warmup_cosine_run(tmp_path / "run", grad_accum_steps)
    assert trainer.state.optimizer_step == steps
    assert recorder.lrs == pytest.approx(expected_run_lrs(steps), rel=1e-12)
