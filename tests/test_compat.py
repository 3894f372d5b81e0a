"""phasetrain.compat: pytorch-accelerated's Trainer, callbacks and placeholders on phasetrain's loop.

Where pytorch-accelerated itself is at hand (``.reference/``, see tests/conftest.py), the same script is run
on both and the events, their order and the run history's epochs are compared."""
from __future__ import annotations

import functools
import os
import pathlib
import signal
from typing import Any

import pytest
import torch
from torch import nn

from phasetrain import ConfigError, NonFiniteLossError, RunInterrupted
from phasetrain.compat import (
    EarlyStoppingCallback,
    StopTrainingError,
    TerminateOnNaNCallback,
    Trainer,
    TrainerCallback,
    TrainerPlaceholderValues,
)
from tests.conftest import digits, pytorch_accelerated

EVENTS = ("on_training_run_start", "on_train_epoch_start", "on_train_step_start", "on_train_step_end",
          "on_train_epoch_end", "on_eval_epoch_start", "on_eval_step_start", "on_eval_step_end", "on_eval_epoch_end",
          "on_training_run_epoch_end", "on_training_run_end", "on_stop_training_error",
          "on_evaluation_run_start", "on_evaluation_run_end")


def recorder(base: type) -> Any:
    """A callback of ``base`` (either library's TrainerCallback) that records (event, epoch, batch size)."""

    def record(event: str) -> Any:
        def hook(self: Any, trainer: Any, **kwargs: Any) -> None:
            batch = kwargs.get("batch")
            self.events.append((event, trainer.run_history.current_epoch, None if batch is None else len(batch[0])))
        return hook

    namespace: dict[str, Any] = {name: record(name) for name in EVENTS}
    namespace["__init__"] = lambda self: setattr(self, "events", [])
    return type("Recorder", (base,), namespace)()


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def small(split: str, size: int) -> torch.utils.data.Dataset:
    return torch.utils.data.Subset(digits()[split], range(size))


def train(trainer_class: type, callbacks: list[Any], **kwargs: Any) -> Any:
    net = model()
    trainer = trainer_class(model=net, loss_func=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                            callbacks=callbacks)
    arguments = {"train_dataset": small("train", 40), "eval_dataset": small("eval", 20), "num_epochs": 2,
                 "per_device_batch_size": 16, "train_dataloader_kwargs": {"num_workers": 0},
                 "eval_dataloader_kwargs": {"num_workers": 0}, **kwargs}
    trainer.train(**arguments)
    return trainer


def test_events_fire_in_pytorch_accelerated_order_with_its_epochs_and_batches() -> None:
    ours = recorder(TrainerCallback)
    train(Trainer, [ours])
    epoch = [("on_train_epoch_start", None), *[(e, size) for size in (16, 16, 8)
                                               for e in ("on_train_step_start", "on_train_step_end")],
             ("on_train_epoch_end", None), ("on_eval_epoch_start", None),
             *[(e, size) for size in (16, 4) for e in ("on_eval_step_start", "on_eval_step_end")],
             ("on_eval_epoch_end", None), ("on_training_run_epoch_end", None)]
    # on_train_step_start and on_eval_step_start carry no batch
    expected = [("on_training_run_start", 1, None),
                *[(e, n, size if e.endswith("_end") and "step" in e else None) for n in (1, 2) for e, size in epoch],
                ("on_training_run_end", 3, None)]
    assert ours.events == expected
    pa = pytorch_accelerated()
    theirs = recorder(pa.callbacks.TrainerCallback)
    train(pa.Trainer, [theirs])
    assert theirs.events == ours.events


class Lengths(TrainerCallback):
    def on_train_epoch_start(self, trainer: Any, **kwargs: Any) -> None:
        self.seen = (len(trainer._train_dataloader), len(trainer._eval_dataloader))


def test_callbacks_that_ask_the_length_of_the_loaders_get_this_process_batch_counts() -> None:
    lengths = Lengths()
    train(Trainer, [lengths])
    assert lengths.seen == (3, 2)  # 40 train samples and 20 eval samples, in batches of 16


def test_the_logged_train_loss_is_the_true_mean_with_accumulation() -> None:
    # With lr 0 the weights never move: every epoch's mean loss is the same, whatever the accumulation.
    # pytorch-accelerated divides the logged loss by the accumulation steps.
    def loss(accumulation: int) -> float:
        net = model()
        trainer = Trainer(net, nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.0), callbacks=[])
        trainer.train(train_dataset=small("train", 40), num_epochs=1, per_device_batch_size=8,
                      gradient_accumulation_steps=accumulation, train_dataloader_kwargs={"num_workers": 0})
        return trainer.run_history.get_latest_metric("train_loss_epoch")

    assert loss(2) == pytest.approx(loss(1), rel=1e-6)


def test_placeholders_resolve_to_this_process_optimizer_steps_with_accumulation() -> None:
    # 40 samples, batch 8, accumulation 2: 5 batches, 3 optimizer steps per epoch. OneCycleLR refuses a step
    # past its total: stepped exactly its total, one more step fails.
    schedule = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1,
                                 epochs=TrainerPlaceholderValues.NUM_EPOCHS,
                                 steps_per_epoch=TrainerPlaceholderValues.NUM_UPDATE_STEPS_PER_EPOCH)
    trainer = train(Trainer, [], per_device_batch_size=8, gradient_accumulation_steps=2, create_scheduler_fn=schedule,
                    eval_dataset=None)
    assert trainer.scheduler.total_steps == 6
    assert trainer.run_config.num_update_steps_per_epoch == 3
    assert trainer.scheduler.last_epoch == 6
    with pytest.raises(ValueError, match="Tried to step 7 times"):
        trainer.scheduler.step()
    doubled = TrainerPlaceholderValues.NUM_EPOCHS * 2 + 1
    from phasetrain.compat.trainer import replace_trainer_placeholder_values
    assert replace_trainer_placeholder_values(trainer, functools.partial(dict, n=doubled))() == {"n": 5}


class Constant(TrainerCallback):
    def on_eval_epoch_end(self, trainer: Any, **kwargs: Any) -> None:
        trainer.run_history.update_metric("constant", 1.0)


def test_early_stopping_ends_training_after_its_patience_and_fires_the_stop_event() -> None:
    events = recorder(TrainerCallback)
    trainer = train(Trainer, [Constant(), EarlyStoppingCallback(early_stopping_patience=2, watch_metric="constant"),
                              events], num_epochs=6)
    assert trainer.state.epoch == 3  # best at 1, no improvement at 2 and 3
    names = [event for event, _, _ in events.events]
    assert names.count("on_stop_training_error") == 1 and names[-1] == "on_training_run_end"


class Raises(TrainerCallback):
    def on_train_epoch_end(self, trainer: Any, **kwargs: Any) -> None:
        if trainer.run_history.current_epoch == 2:
            raise StopTrainingError("enough")


def test_a_stop_training_error_from_a_callback_ends_the_run_after_that_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    trainer = train(Trainer, [Raises()], num_epochs=5)
    assert trainer.state.epoch == 2 and trainer.run_history.current_epoch == 3
    assert "enough" in capsys.readouterr().out


def test_resume_from_without_the_run_folder_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^resume_from='latest' needs the run folder of the run to continue"):
        train(Trainer, [], resume_from="latest")


def test_a_misspelled_event_is_refused_when_the_callback_is_added() -> None:
    class Typo(TrainerCallback):
        def on_train_epoch_ned(self, trainer: Any, **kwargs: Any) -> None: ...

    with pytest.raises(ValueError, match=r"Typo defines on_train_epoch_ned, which is no callback event \(did you "
                                         r"mean on_train_epoch_end\?\)"):
        Trainer(model(), nn.CrossEntropyLoss(), torch.optim.SGD(model().parameters(), lr=0.1), callbacks=[Typo()])


def test_a_nan_loss_stops_with_the_step_named_instead_of_exiting() -> None:
    class NaNLoss(Trainer):
        def calculate_train_batch_loss(self, batch: Any) -> dict[str, Any]:
            output = super().calculate_train_batch_loss(batch)
            return {**output, "loss": output["loss"] * float("nan")}

    with pytest.raises(NonFiniteLossError, match="at epoch 1, optimizer step 1"):
        train(NaNLoss, [])


def test_a_run_dir_makes_the_run_resumable_bit_for_bit(tmp_path: pathlib.Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    class Crash(TrainerCallback):
        def on_train_step_end(self, trainer: Any, **kwargs: Any) -> None:
            if trainer.run_history.current_epoch == 2 and kwargs["step"] == 1:
                raise RuntimeError("crash")

    whole = train(Trainer, [], run_dir=tmp_path / "whole")
    with pytest.raises(RuntimeError, match="crash"):
        train(Trainer, [Crash()], run_dir=tmp_path / "cut")
    capsys.readouterr()
    resumed = train(Trainer, [], run_dir=tmp_path / "cut", resume_from="latest")
    assert f"resuming {tmp_path / 'cut'} from epoch001-step0000003-checkpoint: epoch 1" in capsys.readouterr().out
    assert resumed.run_history.get_metric_values("eval_loss_epoch") == whole.run_history.get_metric_values("eval_loss_epoch")
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_save_and_load_checkpoint_round_trip_and_evaluate_records_evaluation_loss(tmp_path: pathlib.Path) -> None:
    trainer = train(Trainer, [])
    trainer.save_checkpoint(tmp_path / "model.pt")
    net = model()
    fresh = Trainer(net, nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1), callbacks=[])
    fresh.load_checkpoint(tmp_path / "model.pt")
    for a, b in zip(trainer.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(a, b)
    events = recorder(TrainerCallback)
    fresh.callback_handler.add_callback(events)
    results = fresh.evaluate(dataset=small("eval", 20), per_device_batch_size=16, dataloader_kwargs={"num_workers": 0})
    assert fresh.run_history.get_latest_metric("evaluation_loss") == results["loss"]
    assert [e for e, _, _ in events.events] == ["on_evaluation_run_start", "on_eval_epoch_start", "on_eval_step_start",
                                                "on_eval_step_end", "on_eval_step_start", "on_eval_step_end",
                                                "on_eval_epoch_end", "on_evaluation_run_end"]


def test_a_nan_eval_loss_stops_training_once_after_that_evaluation(capsys: pytest.CaptureFixture[str]) -> None:
    class NaNEval(Trainer):
        def calculate_eval_batch_loss(self, batch: Any) -> dict[str, Any]:
            output = super().calculate_eval_batch_loss(batch)
            return {**output, "loss": output["loss"] * float("nan")}

    events = recorder(TrainerCallback)
    trainer = train(NaNEval, [TerminateOnNaNCallback(), events], num_epochs=4)
    assert trainer.state.epoch == 1
    assert [e for e, _, _ in events.events].count("on_stop_training_error") == 1
    assert capsys.readouterr().out.count("Stopping training due to NaN loss in validation step") == 1


def test_loaders_of_its_own_and_unused_loader_settings_are_named() -> None:
    class OwnLoader(Trainer):
        def create_eval_dataloader(self, batch_size: int, eval_dl_kwargs: Any = None) -> Any:
            raise AssertionError("never called")

    with pytest.raises(ConfigError, match=r"^OwnLoader overrides create_eval_dataloader; phasetrain builds its "
                                          r"loaders itself"):
        train(OwnLoader, [])
    with pytest.warns(UserWarning, match=r"^train_dataloader_kwargs: persistent_workers, worker_init_fn not used"):
        train(Trainer, [], train_dataloader_kwargs={"num_workers": 0, "worker_init_fn": print,
                                                    "persistent_workers": False, "pin_memory": True})


def test_a_resume_may_not_change_the_epochs_a_schedule_was_sized_by(tmp_path: pathlib.Path) -> None:
    class Crash(TrainerCallback):
        def on_train_epoch_start(self, trainer: Any, **kwargs: Any) -> None:
            if trainer.run_history.current_epoch == 2:
                raise RuntimeError("crash")

    schedule = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1,
                                 epochs=TrainerPlaceholderValues.NUM_EPOCHS,
                                 steps_per_epoch=TrainerPlaceholderValues.NUM_UPDATE_STEPS_PER_EPOCH)
    with pytest.raises(RuntimeError, match="crash"):
        train(Trainer, [Crash()], run_dir=tmp_path / "run", create_scheduler_fn=schedule)
    with pytest.raises(ConfigError, match=r"^train.epochs 2 -> 4 changed since checkpoint .*, but the scheduler was "
                                          r"sized by \{epochs\}"):
        train(Trainer, [], run_dir=tmp_path / "run", create_scheduler_fn=schedule, num_epochs=4, resume_from="latest")


def test_evaluate_from_a_callback_during_training_evaluates_with_the_running_trainer() -> None:
    class EvaluateTwice(TrainerCallback):
        def on_train_epoch_end(self, trainer: Any, **kwargs: Any) -> None:
            self.loss = trainer.evaluate(small("eval", 20))["loss"]

    evaluating = EvaluateTwice()
    trainer = train(Trainer, [evaluating], num_epochs=1)
    assert evaluating.loss == pytest.approx(trainer.run_history.get_latest_metric("eval_loss_epoch"), rel=1e-6)


def test_max_num_train_steps_of_zero_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"train.max_steps: Input should be greater than or equal to 1"):
        train(Trainer, [], max_num_train_steps=0)


def test_a_sigterm_checkpoints_and_the_run_resumes_bit_for_bit(tmp_path: pathlib.Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    class TermAt(TrainerCallback):  # as a cluster scheduler would, in epoch 2
        def on_train_step_end(self, trainer: Any, **kwargs: Any) -> None:
            if trainer.run_history.current_epoch == 2 and kwargs["step"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    whole = train(Trainer, [], run_dir=tmp_path / "whole")
    with pytest.raises(RunInterrupted) as stopped:
        train(Trainer, [TermAt()], run_dir=tmp_path / "cut")
    assert stopped.value.checkpoint == tmp_path / "cut" / "checkpoints" / "epoch002-step0000005-train_epoch"
    capsys.readouterr()
    resumed = train(Trainer, [], run_dir=tmp_path / "cut", resume_from="latest")
    assert "from epoch002-step0000005-train_epoch" in capsys.readouterr().out
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
