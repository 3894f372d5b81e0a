"""Real training on the digits data through the real accelerate, transitions and torch."""
from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import pytest
import torch
import torchmetrics

from examples.digits import make_model
from phasetrain import Callback, EarlyStopping, RunConfig, Trainer
from tests.conftest import PhaseRecorder, digits, digits_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_main_job_reaches_95_percent_test_accuracy(tmp_path: pathlib.Path) -> None:
    config = RunConfig.from_file(ROOT / "examples/digits.yaml",
                                 overrides=[f"run_dir={tmp_path / 'run'}", "train.progress_bar=false"])
    history = Trainer(config).run()
    assert history.get_latest_metric("test/accuracy") >= 0.95
    assert len(history.get_metric_values("eval/accuracy")) == config.train.epochs
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_the_example_reads_the_same_digits_as_scikit_learn() -> None:
    from sklearn.datasets import load_digits as sklearn_load_digits

    from examples.digits import load_digits
    pixels, labels = load_digits()
    reference = sklearn_load_digits()
    assert np.array_equal(pixels, reference.data) and np.array_equal(labels, reference.target)
    assert pixels.shape == (1797, 64)


def test_phase_sequence_comes_from_the_machine(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 6, "eval_every": 2}, checkpoint={"every_epochs": 3})
    recorder = PhaseRecorder()
    Trainer(config, callbacks=[recorder]).run()
    assert recorder.visited == [
        "setup",
        "train_epoch:1", "train_epoch:2", "eval_epoch:2", "train_epoch:3", "checkpoint:3",
        "train_epoch:4", "eval_epoch:4", "train_epoch:5", "train_epoch:6", "eval_epoch:6", "checkpoint:6",
        "done",
    ]


def test_last_epoch_is_always_evaluated_and_checkpointed(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 3, "eval_every": 2}, checkpoint={"every_epochs": 2})
    recorder = PhaseRecorder()
    Trainer(config, callbacks=[recorder]).run()
    assert recorder.visited == ["setup", "train_epoch:1", "train_epoch:2", "eval_epoch:2", "checkpoint:2",
                                "train_epoch:3", "eval_epoch:3", "checkpoint:3", "done"]


class HookRecorder(Callback):
    """Every hook as (hook, epoch, optimizer_step), in firing order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    def _add(self, trainer: Trainer, name: str) -> None:
        self.events.append((name, trainer.state.epoch, trainer.state.optimizer_step))

    def on_run_start(self, trainer: Trainer) -> None:
        self._add(trainer, "run_start")

    def on_run_end(self, trainer: Trainer) -> None:
        self._add(trainer, "run_end")

    def on_enter_train_epoch(self, trainer: Trainer) -> None:
        self._add(trainer, "enter_train")

    def on_exit_train_epoch(self, trainer: Trainer) -> None:
        self._add(trainer, "exit_train")

    def on_enter_eval_epoch(self, trainer: Trainer) -> None:
        self._add(trainer, "enter_eval")

    def on_exit_eval_epoch(self, trainer: Trainer) -> None:
        self._add(trainer, "exit_eval")

    def on_train_step_start(self, trainer: Trainer) -> None:
        self._add(trainer, "step_start")

    def on_before_backward(self, trainer: Trainer, loss: torch.Tensor) -> None:
        self._add(trainer, "before_backward")

    def on_after_backward(self, trainer: Trainer) -> None:
        self._add(trainer, "after_backward")

    def on_train_batch_end(self, trainer: Trainer, batch: Any, batch_output: dict) -> None:
        self._add(trainer, f"batch_end:{len(batch[0])}:{batch_output['batch_size']}")

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        self._add(trainer, "step_end")

    def on_eval_step_start(self, trainer: Trainer) -> None:
        self._add(trainer, "eval_step_start")

    def on_eval_step_end(self, trainer: Trainer, batch: Any, batch_output: dict) -> None:
        self._add(trainer, f"eval_step_end:{len(batch[0])}")


def test_hooks_fire_in_order_exactly_as_often_as_they_should(tmp_path: pathlib.Path) -> None:
    # 10 train samples at batch 4 -> batches of 4, 4, 2; accumulation 2 -> steps of [2 batches], [1 batch].
    data = digits()
    train = torch.utils.data.Subset(data["train"], range(10))
    evaluation = torch.utils.data.Subset(data["eval"], range(5))
    config = digits_config(tmp_path / "run", data=None,
                           train={"epochs": 2, "batch_size": 4, "eval_batch_size": 3, "grad_accum_steps": 2,
                                  "log_every_steps": 0})
    recorder = HookRecorder()
    Trainer(config, train_data=train, eval_data=evaluation, callbacks=[recorder]).run()

    def epoch(n: int, first_step: int) -> list[tuple[str, int, int]]:
        micro = [("before_backward", n, first_step), ("after_backward", n, first_step),
                 ("batch_end:4:4", n, first_step)]
        return [("enter_train", n, first_step - 0),
                ("step_start", n, first_step), *micro, *micro, ("step_end", n, first_step + 1),
                ("step_start", n, first_step + 1), ("before_backward", n, first_step + 1),
                ("after_backward", n, first_step + 1), ("batch_end:2:2", n, first_step + 1),
                ("step_end", n, first_step + 2),
                ("exit_train", n, first_step + 2), ("enter_eval", n, first_step + 2),
                *[(e, n, first_step + 2) for size in (3, 2) for e in ("eval_step_start", f"eval_step_end:{size}")],
                ("exit_eval", n, first_step + 2)]

    assert recorder.events == [("run_start", 0, 0), *epoch(1, 0), *epoch(2, 2), ("run_end", 2, 4)]


def test_sgd_weights_match_hand_computed_values(tmp_path: pathlib.Path) -> None:
    # One linear weight w, loss = mean((w*x - y)^2), plain SGD: w' = w - lr * mean(2 * x * (w*x - y)).
    inputs = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    targets = torch.tensor([[2.0], [4.0], [6.0], [8.0]])
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    config = RunConfig.from_dict({"run_dir": str(tmp_path / "run"),
                                  "train": {"epochs": 2, "batch_size": 2, "shuffle": False, "progress_bar": False},
                                  "checkpoint": {"every_epochs": 0}})
    history = Trainer(config, model=model, loss_fn=torch.nn.MSELoss(), optimizer=optimizer,
                      train_data=torch.utils.data.TensorDataset(inputs, targets)).run()
    w, epoch_losses = 0.5, []
    for _ in range(2):
        batch_losses = []
        for x, y in (((1.0, 2.0), (2.0, 4.0)), ((3.0, 4.0), (6.0, 8.0))):
            batch_losses.append(sum((w * xi - yi) ** 2 for xi, yi in zip(x, y, strict=True)) / 2)
            grad = sum(2 * xi * (w * xi - yi) for xi, yi in zip(x, y, strict=True)) / 2
            w -= 0.01 * grad
        epoch_losses.append(sum(batch_losses) / 2)  # two batches of two samples: the sample-weighted mean
    assert model.weight.item() == pytest.approx(w, rel=1e-6)
    assert history.get_metric_values("train/loss") == pytest.approx(epoch_losses, rel=1e-6)


def test_metrics_file_and_history_record_every_epoch(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 3, "log_every_steps": 10})
    trainer = Trainer(config)
    history = trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"phase", "epoch", "step", "kind"} <= row.keys() for row in rows)
    epoch_rows = [r for r in rows if r["kind"] == "epoch"]
    assert [(r["phase"], r["epoch"]) for r in epoch_rows] == [
        ("train_epoch", 1), ("eval_epoch", 1), ("train_epoch", 2), ("eval_epoch", 2),
        ("train_epoch", 3), ("eval_epoch", 3), ("done", 3)]
    step_rows = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in step_rows] == list(range(10, 3 * trainer.data.steps_per_epoch + 1, 10))
    assert history.get_metric_names() >= {"train/loss", "train/lr", "eval/loss", "eval/accuracy",
                                          "test/loss", "test/accuracy"}
    assert history.get_metric_values("eval/loss") == [r["eval/loss"] for r in epoch_rows if r["phase"] == "eval_epoch"]
    assert history.get_latest_metric("train/loss") < history.get_metric_values("train/loss")[0]


def test_evaluate_matches_a_hand_written_eval_and_predict_keeps_dataset_order(config: RunConfig) -> None:
    trainer = Trainer(config)
    trainer.run()
    test = digits()["test"]
    results = trainer.evaluate(test)
    predictions = trainer.predict(test)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    inputs, targets = test.tensors
    with torch.no_grad():
        expected = model(inputs)
    assert torch.equal(predictions, expected)
    accuracy = (expected.argmax(1) == targets).float().mean().item()
    assert results["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert results["loss"] == pytest.approx(torch.nn.functional.cross_entropy(expected, targets).item(), rel=1e-5)


def test_metrics_can_be_passed_as_objects(config: RunConfig) -> None:
    metric = torchmetrics.classification.MulticlassF1Score(num_classes=10, average="macro")
    history = Trainer(config, metrics={"f1": metric}).run()
    assert 0.5 < history.get_latest_metric("eval/f1") <= 1.0
    assert "eval/accuracy" not in history.get_metric_names()


def test_a_callback_can_stop_the_run(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 20})
    recorder = PhaseRecorder()
    # Patience 0 after the first evaluation: improvement is impossible to beat with a huge min_delta.
    stopper = EarlyStopping(monitor="eval/loss", patience=1, min_delta=1e9)
    trainer = Trainer(config, callbacks=[stopper, recorder])
    trainer.run()
    assert recorder.visited == ["setup", "train_epoch:1", "eval_epoch:1", "train_epoch:2", "eval_epoch:2", "done"]
    assert trainer.state.stop_reason.startswith("early stopping")
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_stop_requested_mid_epoch_ends_after_the_current_optimizer_step(tmp_path: pathlib.Path) -> None:
    class StopAtStep(Callback):
        def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
            if trainer.state.optimizer_step == 5:
                trainer.request_stop("enough")

    config = digits_config(tmp_path / "run", train={"epochs": 3})
    trainer = Trainer(config, callbacks=[StopAtStep()])
    trainer.run()
    assert (trainer.state.epoch, trainer.state.optimizer_step) == (1, 5)


def test_gradient_accumulation_equals_a_larger_batch(tmp_path: pathlib.Path) -> None:
    # Without dropout, 2 x 16 accumulated is the same update as one batch of 32 (up to float rounding).
    def final_weights(batch_size: int, accum: int, name: str) -> torch.Tensor:
        config = digits_config(tmp_path / name, model={"args": {"hidden": 32, "dropout": 0.0}},
                               train={"epochs": 1, "batch_size": batch_size, "grad_accum_steps": accum,
                                      "shuffle": False})
        trainer = Trainer(config)
        trainer.run()
        return torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach()

    assert torch.allclose(final_weights(32, 1, "a"), final_weights(16, 2, "b"), atol=1e-5)


class DtypeProbe(torch.nn.Module):
    """The digits MLP, recording the dtype its layers compute in (autocast changes it, not the weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model(hidden=64)
        self.seen: set[torch.dtype] = set()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = self.net(inputs)
        self.seen.add(outputs.dtype)
        return outputs


@pytest.mark.parametrize(("precision", "computed_in"), [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_mixed_precision_really_computes_in_that_precision(tmp_path: pathlib.Path, precision: str,
                                                          computed_in: torch.dtype) -> None:
    config = digits_config(tmp_path / "run", model=None, train={"epochs": 3, "mixed_precision": precision})
    torch.manual_seed(0)
    probe = DtypeProbe()
    history = Trainer(config, model=probe).run()
    assert probe.seen == {computed_in}  # train, eval and test forwards alike
    assert probe.net[0].weight.dtype == torch.float32  # the weights stay in full precision
    assert history.get_latest_metric("eval/accuracy") > 0.8


class DictBatches(torch.utils.data.Dataset):
    """Samples as dicts with the user's own keys: the overridable step reads them."""

    def __init__(self, base: torch.utils.data.TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels, label = self.base[index]
        return {"pixels": pixels, "label": label}


class DictTrainer(Trainer):
    def calculate_train_batch_loss(self, batch: dict) -> dict:
        outputs = self.model(batch["pixels"])
        return {"loss": self.loss_fn(outputs, batch["label"]), "model_outputs": outputs,
                "batch_size": len(batch["label"])}

    def update_metrics(self, batch: dict, batch_output: dict) -> None:
        for metric in self.metrics.values():
            metric.update(batch_output["model_outputs"], batch["label"])

    def predict_step(self, batch: dict) -> torch.Tensor:
        return self.model(batch["pixels"])


def test_custom_batch_format_through_overridable_steps(tmp_path: pathlib.Path) -> None:
    data = digits()
    config = digits_config(tmp_path / "run", data=None, train={"epochs": 3})
    trainer = DictTrainer(config, train_data=DictBatches(data["train"]), eval_data=DictBatches(data["eval"]))
    history = trainer.run()
    assert history.get_latest_metric("eval/accuracy") > 0.85
    assert trainer.predict(DictBatches(data["test"])).shape == (len(data["test"]), 10)


class Stream(torch.utils.data.IterableDataset):
    """An iterable dataset with no length: phasetrain cannot own its order."""

    def __init__(self, base: torch.utils.data.TensorDataset) -> None:
        self.base = base

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.base)


def test_iterable_dataset_without_length_trains_with_accumulation(tmp_path: pathlib.Path) -> None:
    data = digits()
    config = digits_config(tmp_path / "run", data=None, train={"epochs": 2, "grad_accum_steps": 3})
    trainer = Trainer(config, train_data=Stream(data["train"]), eval_data=data["eval"])
    history = trainer.run()
    batches = -(-len(data["train"]) // 32)
    assert trainer.state.optimizer_step == 2 * -(-batches // 3)  # the short last group still steps
    assert history.get_latest_metric("eval/accuracy") > 0.6


def test_reduce_lr_on_plateau_steps_on_the_monitored_metric(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 4},
                           scheduler={"target": "torch.optim.lr_scheduler:ReduceLROnPlateau",
                                      "args": {"mode": "max", "patience": 0, "factor": 0.5, "threshold": 10.0},
                                      "interval": "epoch"},
                           checkpoint={"monitor": "eval/accuracy", "mode": "max"})
    history = Trainer(config).run()
    # threshold 10 makes every evaluation after the first "no better": the LR halves after evaluations 2
    # and 3, which the train records of epochs 3 and 4 show (train/lr is logged before the evaluation).
    assert history.get_metric_values("train/lr") == pytest.approx([0.003, 0.003, 0.0015, 0.00075])


def test_evaluate_from_a_callback_leaves_the_model_training(tmp_path: pathlib.Path) -> None:
    seen: list[bool] = []

    class EvaluateMidEpoch(Callback):
        def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
            if trainer.state.optimizer_step == 3:
                trainer.evaluate(digits()["eval"])
            if trainer.state.optimizer_step == 4:
                seen.append(trainer.model.training)

    Trainer(digits_config(tmp_path / "run", train={"epochs": 1}), callbacks=[EvaluateMidEpoch()]).run()
    assert seen == [True]


def test_a_subclass_of_a_default_callback_replaces_it_at_construction_and_in_add_callback(
        tmp_path: pathlib.Path) -> None:
    from phasetrain import MetricsFile, ProgressBar

    class MyMetricsFile(MetricsFile):
        pass

    class MyBar(ProgressBar):
        def __init__(self) -> None:
            super().__init__()
            self.epochs_opened = 0

        def on_enter_train_epoch(self, trainer: Trainer) -> None:
            self.epochs_opened += 1
            super().on_enter_train_epoch(trainer)

    config = digits_config(tmp_path / "run", train={"epochs": 2, "progress_bar": True})
    trainer = Trainer(config, callbacks=[MyMetricsFile()])
    assert sum(isinstance(cb, ProgressBar) for cb in trainer.callbacks) == 1  # the default bar is there
    bar = MyBar()
    trainer.add_callback(bar)
    kinds = [type(cb) for cb in trainer.callbacks]
    assert MyMetricsFile in kinds and MyBar in kinds
    assert MetricsFile not in kinds and ProgressBar not in kinds
    assert sum(isinstance(cb, MetricsFile) for cb in trainer.callbacks) == 1
    assert sum(isinstance(cb, ProgressBar) for cb in trainer.callbacks) == 1
    trainer.run()
    assert bar.epochs_opened == 2
