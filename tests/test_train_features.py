"""The training features of the config: max_steps, limit_batches, fast_dev_run, clipping by value, the
epoch-interval scheduler, early stopping's mode and min_delta, and a dataset without a length."""
from __future__ import annotations

import copy
import pathlib
import re
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from phasetrain import Callback, ConfigError, EarlyStopping, RunConfig, Trainer
from phasetrain.callbacks import say
from tests.conftest import digits, digits_config, records_without_times

# The digits train split has 1257 samples: at batch 64 an epoch has 20 optimizer steps.
FAST = {"batch_size": 64, "log_every_steps": 0}


def records(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    """The step and epoch records of metrics.jsonl, without their times (which differ on every run)."""
    return [record for record in records_without_times(run_dir) if record["kind"] != "phase"]


class Crash(Callback):
    """Raises at optimizer step ``step``, as a crash would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.state.optimizer_step == self.step:
            raise RuntimeError("crash")


def test_max_steps_stops_mid_epoch_at_that_step_evaluates_checkpoints_and_resumes_exactly(tmp_path: pathlib.Path) -> None:
    def config(name: str) -> RunConfig:
        return digits_config(tmp_path / name, train={"epochs": 3, "max_steps": 25, **FAST},
                             checkpoint={"every_epochs": 1, "every_steps": 10})

    Trainer(config("whole")).run()
    run = records(tmp_path / "whole")
    assert [(r["phase"], r["epoch"], r["step"]) for r in run] == [
        ("train_epoch", 1, 20), ("eval_epoch", 1, 20), ("train_epoch", 2, 25), ("eval_epoch", 2, 25),
        ("done", 2, 25)]
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())[-2:] == [
        "epoch002-step0000025-checkpoint", "latest"]

    with pytest.raises(RuntimeError, match="crash"):
        Trainer(config("cut"), callbacks=[Crash(step=22)]).run()
    Trainer(config("cut")).run(resume="latest")  # from step 20, mid-epoch 2
    final = [load_file(tmp_path / name / "model.safetensors") for name in ("whole", "cut")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert records(tmp_path / "cut") == run


class Counter(Callback):
    def __init__(self) -> None:
        self.train_batches = self.eval_batches = 0

    def on_train_batch_end(self, trainer: Trainer, batch: Any, batch_output: dict[str, Any]) -> None:
        self.train_batches += 1

    def on_eval_step_end(self, trainer: Trainer, batch: Any, batch_output: dict[str, Any]) -> None:
        self.eval_batches += 1


def test_limit_batches_trains_and_evaluates_the_first_batches_only(tmp_path: pathlib.Path) -> None:
    counter = Counter()
    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 2, "limit_batches": 3, "grad_accum_steps": 2,
                                                             **FAST}), callbacks=[counter])
    trainer.run()
    assert (counter.train_batches, counter.eval_batches, trainer.state.optimizer_step) == (6, 6, 4)  # steps [2, 1]


def test_fast_dev_run_runs_one_batch_of_each_phase_and_writes_nothing(tmp_path: pathlib.Path) -> None:
    counter = Counter()
    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 5, "fast_dev_run": True, **FAST},
                                    checkpoint={"every_epochs": 1}), callbacks=[counter])
    history = trainer.run()
    assert (counter.train_batches, counter.eval_batches, trainer.state.epoch) == (1, 1, 1)
    assert "test/loss" in history.get_metric_names()  # the done phase ran too
    assert not (tmp_path / "run").exists()
    assert not trainer.run_folder.path.parent.exists()  # the throwaway folder is gone with the run


def clip_by_value(model: torch.nn.Module, clip: float) -> None:
    for parameter in model.parameters():
        parameter.grad.clamp_(-clip, clip)


def clip_by_norm(model: torch.nn.Module, clip: float) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)


@pytest.mark.parametrize(("key", "clip", "by_hand"), [("max_grad_value", 1e-3, clip_by_value),
                                                      ("max_grad_norm", 0.05, clip_by_norm)], ids=["value", "norm"])
def test_clipping_clips_the_accumulated_gradient_once_on_the_update_step(tmp_path: pathlib.Path, key: str,
                                                                        clip: float, by_hand: Any) -> None:
    # One SGD step (lr 1) from two micro-batches, by hand: w - clip(g1/2 + g2/2). Clipping each partial sum,
    # as pytorch-accelerated does (clip(clip(g1/2) + g2/2)), gives other weights, even other signs.
    config = digits_config(tmp_path / "run", optimizer={"target": "torch.optim:SGD", "args": {"lr": 1.0}},
                           model={"args": {"hidden": 64, "dropout": 0.0}},
                           train={"epochs": 1, "limit_batches": 2, "grad_accum_steps": 2, key: clip,
                                  "shuffle": False, **FAST})
    trainer = Trainer(config)
    model = copy.deepcopy(trainer.model)
    train = digits()["train"]
    for first in (0, 64):
        inputs, targets = (torch.stack(column) for column in zip(*(train[i] for i in range(first, first + 64))))
        (torch.nn.functional.cross_entropy(model(inputs), targets) / 2).backward()
    by_hand(model, clip)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter -= parameter.grad
    trainer.run()
    for expected, trained in zip(model.parameters(), trainer.model.parameters(), strict=True):
        torch.testing.assert_close(trained, expected, rtol=0, atol=1e-7)


def test_an_epoch_scheduler_steps_after_each_epoch_and_logs_the_rate_the_epoch_trained_with(
        tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 3, "limit_batches": 2, **FAST},
                                    scheduler={"target": "torch.optim.lr_scheduler:StepLR",
                                               "args": {"step_size": 1, "gamma": 0.5}, "interval": "epoch"}))
    history = trainer.run()
    assert history.get_metric_values("train/lr") == pytest.approx([0.003, 0.0015, 0.00075])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.000375)


class Constant(Callback):
    """Logs ``score/value`` after every eval: the values given, in turn."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_exit_eval_epoch(self, trainer: Trainer) -> None:
        trainer.log({"score/value": self.values[trainer.state.epoch - 1]})


@pytest.mark.parametrize(("mode", "min_delta", "stopped_after"), [("max", 0.0, 4), ("max", 0.15, 3), ("min", 0.0, 3)])
def test_early_stopping_follows_mode_and_min_delta(tmp_path: pathlib.Path, mode: str, min_delta: float,
                                                   stopped_after: int) -> None:
    # max: 1.0, then 1.1 improves by 0.1 (enough unless min_delta is 0.15), then no improvement twice.
    # min: 1.0 is best, then 1.1 twice: two evaluations without improvement. The value is logged from an exit
    # hook, so the stop is requested while the walk leaves eval_epoch: that very move must go to done.
    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 6, "limit_batches": 1, **FAST}),
                      callbacks=[Constant([1.0, 1.1, 1.1, 1.1, 1.1, 1.1]),
                                 EarlyStopping(monitor="score/value", mode=mode, patience=2, min_delta=min_delta)])
    trainer.run()
    assert trainer.state.epoch == stopped_after


class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __iter__(self):  # type: ignore[no-untyped-def]
        data = digits()["train"]
        return (data[i] for i in range(100))


class SayAtStep(Callback):
    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.state.optimizer_step == 10:
            say("the bar is redrawn under this line, as it counts now")  # tqdm.write redraws open bars


def test_a_dataset_without_a_length_trains_with_a_progress_bar_that_counts_without_a_total(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer = Trainer(digits_config(tmp_path / "run", data=None, train={"epochs": 1, "batch_size": 10,
                                                                         "progress_bar": True}),
                      train_data=Stream(), eval_data=digits()["eval"], callbacks=[SayAtStep()])
    trainer.run()
    assert trainer.state.optimizer_step == 10
    assert re.search(r"epoch 1/1: 10step \[", capsys.readouterr().err)


def test_a_resume_may_not_stretch_a_schedule_sized_by_the_run_length(tmp_path: pathlib.Path) -> None:
    # OneCycleLR's saved state keeps total_steps: a longer resumed run would step past its end.
    scheduler = {"target": "torch.optim.lr_scheduler:OneCycleLR", "args": {"max_lr": 0.01, "total_steps": "{total_steps}"}}
    config = digits_config(tmp_path / "run", scheduler=scheduler, train={"epochs": 1, **FAST},
                           checkpoint={"every_steps": 10})
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(config, callbacks=[Crash(step=15)]).run()
    longer = config.with_overrides(["train.epochs=3"])
    with pytest.raises(ConfigError, match=r"^train.epochs 1 -> 3 changed since checkpoint epoch001-step0000010-"
                                          r"train_epoch, but the scheduler was sized by \{total_steps\} for the old "
                                          r"length, and its saved state keeps that length; restore the old value"):
        Trainer(longer).run(resume="latest")
    lower = config.with_overrides(["train.max_steps=5"])
    with pytest.raises(ConfigError, match=r"^train.max_steps=5, but checkpoint .* is at optimizer step 10: give "
                                          r"train.max_steps >= 10$"):
        Trainer(lower).run(resume="latest")
    Trainer(config).run(resume="latest")  # as it was: fine


def test_limit_batches_applies_to_a_dataset_without_a_length_too(tmp_path: pathlib.Path) -> None:
    counter = Counter()
    trainer = Trainer(digits_config(tmp_path / "run", data=None, train={"epochs": 1, "batch_size": 10,
                                                                         "limit_batches": 3}),
                      train_data=Stream(), eval_data=Stream(), callbacks=[counter])
    trainer.run()
    assert (counter.train_batches, counter.eval_batches, trainer.state.optimizer_step) == (3, 3, 3)


def test_a_collate_fn_makes_the_batches(tmp_path: pathlib.Path) -> None:
    def as_dict(samples: list[Any]) -> dict[str, torch.Tensor]:
        inputs, targets = zip(*samples)
        return {"inputs": torch.stack(inputs), "targets": torch.stack(targets)}

    seen: list[type] = []

    class Kinds(Callback):
        def on_train_batch_end(self, trainer: Trainer, batch: Any, batch_output: dict[str, Any]) -> None:
            seen.append(type(batch))

    data = digits()
    Trainer(digits_config(tmp_path / "run", data=None, train={"epochs": 1, "limit_batches": 2, **FAST}),
            train_data=data["train"], eval_data=data["eval"], collate_fn=as_dict, callbacks=[Kinds()]).run()
    assert seen == [dict, dict]


class StopAt(Callback):
    """Requests a stop when the run starts (before any epoch) or when epoch ``epoch`` is entered."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_run_start(self, trainer: Trainer) -> None:
        if self.epoch == 0:
            trainer.request_stop("at the start")

    def on_enter_train_epoch(self, trainer: Trainer) -> None:
        if trainer.state.epoch == self.epoch:
            trainer.request_stop("at an epoch's start")


def test_a_stop_before_the_first_epoch_goes_to_done_and_an_epoch_without_steps_logs_no_loss(
        tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "early", train={"epochs": 3, **FAST}), callbacks=[StopAt(0)])
    trainer.run()
    assert (trainer.state.phase, trainer.state.epoch) == ("done", 0)
    assert (tmp_path / "early" / "model.safetensors").is_file()
    trainer = Trainer(digits_config(tmp_path / "later", train={"epochs": 3, **FAST}), callbacks=[StopAt(2)])
    history = trainer.run()
    assert len(history.get_metric_values("train/loss")) == 1  # epoch 2 took no step: no loss, not a 0
    assert [r.get("train/loss") is None for r in records(tmp_path / "later") if r["phase"] == "train_epoch"] == [
        False, True]


def test_resuming_a_finished_run_loads_its_final_weights(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 1, **FAST})
    Trainer(config).run()
    again = Trainer(config)
    again.run(resume="latest")
    final = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(final[name], tensor) for name, tensor in again.model.state_dict().items())


def test_fast_dev_run_from_the_command_line_leaves_a_finished_run_dir_alone(tmp_path: pathlib.Path) -> None:
    from tests.test_faults import cli_here
    run_dir = tmp_path / "run"
    Trainer(digits_config(run_dir, train={"epochs": 1, **FAST})).run()
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
    result = cli_here("run", "examples/digits.yaml", f"run_dir={run_dir}", "train.fast_dev_run=true",
                      "train.progress_bar=false")
    assert result.returncode == 0, result.stderr
    assert f"nothing was written to {run_dir}" in result.stdout
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")} == before


def test_an_unquoted_placeholder_is_named_with_the_quotes_it_needs(tmp_path: pathlib.Path) -> None:
    from tests.test_faults import cli_here
    result = cli_here("run", "examples/digits.yaml", f"run_dir={tmp_path / 'run'}", "scheduler.args.T_max={total_steps}")
    assert result.returncode == 2
    assert result.stderr == ("phasetrain: error: scheduler.args.T_max: {total_steps} was read as a mapping, not text: "
                             "quote it, as in 'scheduler.args.T_max=\"{total_steps}\"' (YAML reads unquoted braces as a "
                             "mapping)\n")


def test_plan_ends_the_walk_where_max_steps_ends_the_run(tmp_path: pathlib.Path) -> None:
    from phasetrain.plan import plan_source
    path = tmp_path / "config.yaml"
    path.write_text(digits_config(tmp_path / "run", train={"epochs": 3, "max_steps": 25, **FAST}).to_yaml())
    lines = plan_source(path, []).splitlines()
    assert lines[2:] == ["  epoch 1 (steps 1-20): train_epoch -> eval_epoch [eval_due]",
                         "  epoch 2 (steps 21-25): train_epoch -> eval_epoch [eval_due] -> done [finished]"]
