"""EMA of the weights, freezing by name pattern, best.safetensors and SyncBatchNorm: real training on digits."""
from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import load_file, load_model

from examples.digits import make_model
from phasetrain import EMA, Callback, ConfigError, Freeze, RunConfig, Trainer
from tests.conftest import ResumePoint, digits_config, records_without_times

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = {"args": {"hidden": 16}}  # the digits MLP at its smallest useful size: these runs take ~0.1 s each


class Crash(Exception):
    pass


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.state.optimizer_step == self.step:
            raise Crash


def crash_and_resume(config: RunConfig, crash_step: int, *callbacks: Callback) -> tuple[str, int, int, bool] | None:
    """Run ``config`` until it crashes after ``crash_step``, then resume it in a new trainer with
    ``callbacks``; returns the (phase, epoch, step, resumed) the resume started at."""
    with pytest.raises(Crash):
        Trainer(config, callbacks=[CrashAtStep(crash_step)]).run()
    point = ResumePoint()
    Trainer(config, callbacks=[point, *callbacks]).run(resume="latest")
    return point.at


# ---- EMA -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("every_steps", [1, 3])
def test_ema_matches_a_hand_computed_average_of_sgd_weights(tmp_path: pathlib.Path, every_steps: int) -> None:
    # One weight w, loss (w*x - y)^2, SGD one sample a step: w' = w - lr * 2x(wx - y); after every
    # `every_steps`-th step the average moves half way to w (decay 0.5); it is evaluated after each epoch.
    xs, ys, lr, decay = (1.0, 2.0, 3.0, 4.0), (2.0, 4.0, 6.0, 8.0), 0.01, 0.5
    data = torch.utils.data.TensorDataset(torch.tensor(xs).reshape(4, 1), torch.tensor(ys).reshape(4, 1))
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    ema = EMA(decay=decay, every_steps=every_steps)
    config = RunConfig.from_dict({"run_dir": str(tmp_path / "run"), "checkpoint": {"every_epochs": 0},
                                  "train": {"epochs": 2, "batch_size": 1, "shuffle": False, "progress_bar": False}})
    history = Trainer(config, model=model, loss_fn=torch.nn.MSELoss(), optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                      train_data=data, eval_data=data, callbacks=[ema]).run()

    w = average = 0.5
    step, ema_losses = 0, []
    for _ in range(2):
        for x, y in zip(xs, ys, strict=True):
            w -= lr * 2 * x * (w * x - y)
            step += 1
            if step % every_steps == 0:
                average = decay * average + (1 - decay) * w
        ema_losses.append(sum((average * x - y) ** 2 for x, y in zip(xs, ys, strict=True)) / 4)
    assert model.weight.item() == pytest.approx(w, rel=1e-6)  # training went on from its own weights
    assert ema.weights()["weight"].item() == pytest.approx(average, rel=1e-6)
    assert abs(average - w) > 1e-3  # the average is not the weight itself
    assert history.get_metric_values("eval_ema/loss") == pytest.approx(ema_losses, rel=1e-5)
    saved = torch.nn.Linear(1, 1, bias=False)
    load_model(saved, str(tmp_path / "run" / "ema.safetensors"))
    assert saved.weight.item() == pytest.approx(average, rel=1e-6)
    assert load_file(tmp_path / "run" / "model.safetensors")["weight"].item() == pytest.approx(w, rel=1e-6)


def test_ema_from_the_config_resumes_bitwise_and_writes_ema_safetensors(tmp_path: pathlib.Path) -> None:
    # 1259 train samples at 32: 40 steps an epoch; checkpoints every 15 steps; the crash after step 50
    # resumes from step 45, in epoch 2, with the average restored from the checkpoint.
    def config(name: str) -> RunConfig:
        return digits_config(tmp_path / name, model={"args": {"hidden": 16, "dropout": 0.3}},
                             callbacks=[{"target": "phasetrain.ema:EMA", "args": {"decay": 0.9}}],
                             checkpoint={"every_steps": 15, "keep_last": 1})

    reference = Trainer(config("a"))
    history = reference.run()
    at = crash_and_resume(config("b"), crash_step=50)
    assert at == ("train_epoch", 2, 45, True)
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "ema.safetensors").read_bytes() == (b / "ema.safetensors").read_bytes()
    assert records_without_times(a) == records_without_times(b)
    assert len(history.get_metric_values("eval_ema/accuracy")) == 2
    assert len(history.get_metric_values("test_ema/accuracy")) == 1
    ema_weights, model_weights = load_file(a / "ema.safetensors"), load_file(a / "model.safetensors")
    assert ema_weights.keys() == model_weights.keys()
    assert not torch.equal(ema_weights["0.weight"], model_weights["0.weight"])
    model = make_model(hidden=16)
    load_model(model, str(b / "ema.safetensors"))  # strict: every key of the model, nothing else


def test_ema_copies_buffers_as_they_are(tmp_path: pathlib.Path) -> None:
    # BatchNorm's running statistics are not averaged: the EMA model uses the model's latest ones.
    from tests.features_job import batchnorm_model
    model = batchnorm_model()
    Trainer(digits_config(tmp_path / "run", model=None, train={"epochs": 1}), model=model,
            callbacks=[EMA(decay=0.9, evaluate=False)]).run()
    ema = load_file(tmp_path / "run" / "ema.safetensors")
    for name, buffer in model.named_buffers():
        assert torch.equal(ema[name], buffer), name
    assert not torch.equal(ema["1.weight"], model.state_dict()["1.weight"])


# ---- freezing ------------------------------------------------------------------------------------------
class LayerWeights(Callback):
    """Layer 0's and layer 3's weights at the start of the run and after each train epoch, and whether
    layer 0 required grad when the run started."""

    def __init__(self) -> None:
        self.at_start: dict[str, torch.Tensor] = {}
        self.after_epoch: dict[int, dict[str, torch.Tensor]] = {}
        self.trainable_at_start: bool | None = None

    def _weights(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        return {"0": model[0].weight.detach().clone(), "3": model[3].weight.detach().clone()}

    def on_run_start(self, trainer: Trainer) -> None:
        self.at_start = self._weights(trainer)
        self.trainable_at_start = trainer.accelerator.unwrap_model(trainer.model)[0].weight.requires_grad

    def on_exit_train_epoch(self, trainer: Trainer) -> None:
        self.after_epoch[trainer.state.epoch] = self._weights(trainer)


ADAMW_WITH_DECAY = {"target": "torch.optim:AdamW", "args": {"lr": 0.003, "weight_decay": 0.1}}


def test_a_backbone_frozen_from_the_start_stays_bitwise_unchanged_until_unfrozen_and_across_a_resume(
        tmp_path: pathlib.Path) -> None:
    # AdamW's weight decay would move a frozen weight that still had a gradient, even a zero one.
    def config(name: str) -> RunConfig:
        return digits_config(tmp_path / name, model=SMALL, optimizer=ADAMW_WITH_DECAY,
                             phases=[{"target": "phasetrain.finetuning:Freeze", "args": {"patterns": ["0.*"]},
                                      "after": "setup"},
                                     {"target": "phasetrain.finetuning:Freeze",
                                      "args": {"patterns": ["0.*"], "frozen": False},
                                      "after": "eval_epoch", "when": {"on_epoch": 1}}],
                             checkpoint={"every_steps": 15, "keep_last": 1})

    seen = LayerWeights()
    Trainer(config("a"), callbacks=[seen]).run()
    assert torch.equal(seen.after_epoch[1]["0"], seen.at_start["0"])  # frozen for all of epoch 1
    assert not torch.equal(seen.after_epoch[1]["3"], seen.at_start["3"])  # while the rest trained
    assert not torch.equal(seen.after_epoch[2]["0"], seen.after_epoch[1]["0"])  # unfrozen: it trains

    # A crash after step 20 of epoch 1 resumes from step 15, inside the frozen period: still frozen.
    resumed_seen = LayerWeights()
    assert crash_and_resume(config("b"), 20, resumed_seen) == ("train_epoch", 1, 15, True)
    assert resumed_seen.trainable_at_start is False
    assert torch.equal(resumed_seen.after_epoch[1]["0"], seen.at_start["0"])
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_freezing_mid_run_drops_the_gradients_the_optimizer_would_still_step(tmp_path: pathlib.Path) -> None:
    class ZeroGradKeepsTensors(Trainer):
        def optimizer_zero_grad(self) -> None:
            self._step_optimizer.zero_grad(set_to_none=False)  # zeros, not None: AdamW would step them

    seen = LayerWeights()
    trainer = ZeroGradKeepsTensors(digits_config(tmp_path / "run", model=SMALL, optimizer=ADAMW_WITH_DECAY),
                                   callbacks=[seen])
    trainer.add_phase(Freeze("0", epoch=1), after="eval_epoch")  # "0": every parameter of module 0
    trainer.run()
    assert not torch.equal(seen.after_epoch[1]["0"], seen.at_start["0"])  # trained in epoch 1
    assert torch.equal(seen.after_epoch[2]["0"], seen.after_epoch[1]["0"])  # frozen after it
    assert not torch.equal(seen.after_epoch[2]["3"], seen.after_epoch[1]["3"])


def test_a_freeze_pattern_that_matches_nothing_is_refused_naming_real_parameters(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", model=SMALL, phases=[
        {"target": "phasetrain.finetuning:Freeze", "args": {"patterns": ["0.*", "backbone.*"]}, "after": "setup"}])
    with pytest.raises(ConfigError) as refused:
        Trainer(config)
    message = str(refused.value)
    assert "'backbone.*' matches no parameter" in message and "0.weight, 0.bias, 3.weight" in message
    assert "\n" not in message
    assert not (tmp_path / "run").exists()


def test_a_freeze_of_every_parameter_is_refused_before_training(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", model=SMALL, phases=[
        {"target": "phasetrain.finetuning:Freeze", "args": {"patterns": ["*"]}, "after": "setup"}])
    with pytest.raises(ConfigError, match=r"^phase 'freeze': patterns \['\*'\] match every parameter of the "
                                          r"Sequential model, so nothing would train"):
        Trainer(config)


# ---- best.safetensors ---------------------------------------------------------------------------------
class WeightsAtCheckpoints(Callback):
    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def on_enter_checkpoint(self, trainer: Trainer) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.by_epoch[trainer.state.epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_best_safetensors_holds_the_weights_of_the_best_epoch_not_the_last(tmp_path: pathlib.Path) -> None:
    # mode max on the eval loss: an early epoch is the best, and keep_last=1 has long deleted its neighbours.
    seen = WeightsAtCheckpoints()
    config = digits_config(tmp_path / "run", model=SMALL, train={"epochs": 3},
                           checkpoint={"every_epochs": 1, "keep_last": 1, "keep_best": 1, "monitor": "eval/loss",
                                       "mode": "max"})
    losses = Trainer(config, callbacks=[seen]).run().get_metric_values("eval/loss")
    best_epoch = losses.index(max(losses)) + 1
    assert best_epoch != 3
    run = tmp_path / "run"
    best, final = load_file(run / "best.safetensors"), load_file(run / "model.safetensors")
    assert best.keys() == seen.by_epoch[best_epoch].keys()
    assert all(torch.equal(best[key], seen.by_epoch[best_epoch][key]) for key in best)
    assert not torch.equal(best["0.weight"], final["0.weight"])

    without = digits_config(tmp_path / "without", model=SMALL, train={"epochs": 1},
                            checkpoint={"every_epochs": 1, "keep_best": 0})
    Trainer(without).run()
    assert not (tmp_path / "without" / "best.safetensors").exists()


# ---- SyncBatchNorm, and what two processes refuse ------------------------------------------------------
def test_sync_batchnorm_leaves_the_model_of_one_process_as_it_is(tmp_path: pathlib.Path) -> None:
    from tests.features_job import batchnorm_model
    model = batchnorm_model()
    config = digits_config(tmp_path / "run", model=None, train={"epochs": 1, "sync_batchnorm": True})
    history = Trainer(config, model=model).run()
    assert type(model[1]) is torch.nn.BatchNorm1d  # one process: plain BatchNorm is already exact
    assert history.get_latest_metric("eval/accuracy") > 0.5
