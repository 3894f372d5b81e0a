"""Bad input stops before training with one readable message, and loses nothing."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

from phasetrain import Callback, CallbackError, ConfigError, DataError, RunConfig, RunDirError, Trainer
from tests.conftest import digits, digits_config


def test_unknown_key_names_the_field_and_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({"train": {"epoch": 3}})
    message = str(info.value)
    assert "train.epoch: unknown key, did you mean 'epochs'?" in message
    assert "\n" not in message


def test_wrong_type_and_negative_epochs_name_field_value_and_expectation() -> None:
    with pytest.raises(ConfigError, match=r"train.batch_size: Input should be a valid integer.*\(got 'big'\)"):
        RunConfig.from_dict({"train": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match=r"train.epochs: Input should be greater than or equal to 1 \(got -2\)"):
        RunConfig.from_dict({}, overrides=["train.epochs=-2"])
    with pytest.raises(ConfigError, match="mixed_precision: Input should be 'no', 'fp16' or 'bf16'"):
        RunConfig.from_dict({"train": {"mixed_precision": "fp8"}})


def test_malformed_override_and_file_errors() -> None:
    with pytest.raises(ConfigError, match="expected 'dotted.key=value'"):
        RunConfig.from_dict({}, overrides=["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_file("no/such/config.yaml")


@pytest.mark.parametrize(("target", "expected"), [
    ("examples.digits", "expected 'module:attribute'"),
    ("examples.nothere:make_model", "cannot import module 'examples.nothere'"),
    ("examples.digits:make_modle", "module 'examples.digits' has no attribute 'make_modle'"),
])
def test_import_spec_that_does_not_resolve(tmp_path: pathlib.Path, target: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        Trainer(digits_config(tmp_path / "run", model={"target": target}))


def test_wrong_component_arguments_name_the_spec(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"model: calling examples.digits:make_model with args .*'width'"):
        Trainer(digits_config(tmp_path / "run", model={"args": {"width": 3}}))


def test_missing_component_says_how_to_provide_it(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"no optimizer: set 'optimizer: .*or pass Trainer\(optimizer=...\)"):
        Trainer(digits_config(tmp_path / "run", optimizer=None))


def test_empty_dataset_is_named(tmp_path: pathlib.Path) -> None:
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match=r"train dataset is empty \(0 samples\)"):
        Trainer(digits_config(tmp_path / "run"), train_data=empty)
    with pytest.raises(DataError, match=r"eval dataset is empty"):
        Trainer(digits_config(tmp_path / "run"), train_data=digits()["train"], eval_data=empty)


def test_model_output_that_does_not_fit_the_loss_stops_before_training(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run")
    wrong = torch.nn.Linear(64, 3)  # 3 logits for 10 classes
    trainer = Trainer(config, model=wrong)
    before = wrong.weight.detach().clone()
    with pytest.raises(DataError, match=r"model output does not fit the loss: Linear gives a torch.float32 tensor "
                                        r"of shape \(2, 3\), targets are a torch.int64 tensor of shape \(2,\)"):
        trainer.run()
    assert torch.equal(wrong.weight, before)  # nothing trained


def test_non_scalar_loss_is_refused(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run"), loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(DataError, match="must return a scalar tensor"):
        trainer.run()


def test_finished_run_is_never_overwritten(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 1})
    Trainer(config).run()
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(RunDirError, match="already holds a finished run"):
        Trainer(config).run()
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    Trainer(config.with_overrides(["overwrite=true", "seed=1"])).run()
    assert (tmp_path / "run" / "model.safetensors").read_bytes() != weights


def test_unknown_callback_hook_fails_before_training(tmp_path: pathlib.Path) -> None:
    class Typo(Callback):
        def on_train_step_ned(self, trainer: Trainer, loss: torch.Tensor) -> None: ...

    class NoSuchPhase(Callback):
        def on_enter_test(self, trainer: Trainer) -> None: ...

    with pytest.raises(CallbackError, match="Typo defines on_train_step_ned, which match no hook"):
        Trainer(digits_config(tmp_path / "run"), callbacks=[Typo()])
    # A phase hook may name a phase added later (add_phase): it is refused when the run starts without it.
    trainer = Trainer(digits_config(tmp_path / "run"), callbacks=[NoSuchPhase()])
    with pytest.raises(CallbackError, match="on_enter_test"):
        trainer.run()
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_cli_prints_one_line_for_a_config_typo(tmp_path: pathlib.Path) -> None:
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "phasetrain.cli", "run", "examples/digits.yaml",
                             f"run_dir={tmp_path / 'run'}", "train.epohcs=2"],
                            check=False, capture_output=True, text=True, cwd=root)
    assert result.returncode == 2
    expected = ("phasetrain: error: examples/digits.yaml: invalid config: train.epohcs: unknown key, did you mean "
                "'epochs'? (known keys: epochs, batch_size, eval_batch_size, grad_accum_steps, max_grad_norm, "
                "max_grad_value, max_steps, limit_batches, fast_dev_run, sync_batchnorm, mixed_precision, compile, compile_mode, num_workers, "
                "eval_every, shuffle, drop_last, log_every_steps, progress_bar, nonfinite_loss)")
    assert result.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "run").exists()


def test_failed_model_check_leaves_the_run_folder_untouched_so_a_retry_works(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run")
    with pytest.raises(DataError):
        Trainer(config, model=torch.nn.Linear(64, 3)).run()
    assert not (tmp_path / "run").exists()
    Trainer(config.with_overrides(["train.epochs=1"])).run()  # the same run_dir, now with a fitting model


def test_overridden_loss_step_is_what_the_model_check_runs(tmp_path: pathlib.Path) -> None:
    class Broken(Trainer):
        def calculate_train_batch_loss(self, batch: object) -> dict:
            raise KeyError("pixels")

    with pytest.raises(DataError, match=r"Broken.calculate_eval_batch_loss failed on a batch of 2 train samples: "
                                        r"KeyError: 'pixels'"):
        Broken(digits_config(tmp_path / "run")).run()


def test_fp16_on_cpu_is_refused_rather_than_silently_ignored(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="'fp16' needs a GPU"):
        Trainer(digits_config(tmp_path / "run", train={"mixed_precision": "fp16"}))


def test_component_that_raises_is_reported_with_its_spec(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", metrics={"accuracy": "torchmetrics.classification:MulticlassAccuracy"})
    with pytest.raises(ConfigError, match=r"metrics.accuracy: calling torchmetrics.classification:MulticlassAccuracy "
                                          r"with args \{\} failed: ValueError: Argument `num_classes`"):
        Trainer(config)


def test_trainer_takes_a_config_path_or_dict_and_names_anything_else(tmp_path: pathlib.Path) -> None:
    root = pathlib.Path(__file__).resolve().parents[1]
    assert Trainer(str(root / "examples/digits.yaml")).config.train.epochs == 15
    assert Trainer(digits_config(tmp_path / "run").to_dict()).config.run_dir == tmp_path / "run"
    with pytest.raises(ConfigError, match="expected a RunConfig, a config file path or a dict, got int"):
        Trainer(3)  # type: ignore[arg-type]


def test_a_metric_that_is_not_a_torchmetric_is_refused_before_training(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="metrics.acc: a function has no update, compute, reset, to"):
        Trainer(digits_config(tmp_path / "run"), metrics={"acc": lambda p, t: 0.0})


def test_a_target_module_that_fails_to_import_is_named(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_mod.py").write_text("def make_model(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing module 'broken_mod' of target 'broken_mod:make_model' failed: "
                                          "SyntaxError"):
        Trainer(digits_config(tmp_path / "run", model={"target": "broken_mod:make_model"}))


def test_drop_last_with_fewer_samples_than_a_batch_is_refused(tmp_path: pathlib.Path) -> None:
    small = torch.utils.data.Subset(digits()["train"], range(10))
    with pytest.raises(DataError, match="train dataset has 10 samples per process, fewer than batch_size 32 "
                                        "with drop_last"):
        Trainer(digits_config(tmp_path / "run", train={"drop_last": True}), train_data=small)


def test_a_monitor_no_metric_matches_is_warned_about_listing_only_what_the_run_logs(tmp_path: pathlib.Path) -> None:
    with pytest.warns(UserWarning, match=r"checkpoint.monitor 'eval/acc' is not a metric this run logs \(eval/accuracy, "
                                         r"eval/loss, test/accuracy, test/loss, train/loss, train/lr\); keep_best keeps "
                                         r"nothing unless a callback logs it"):
        Trainer(digits_config(tmp_path / "run", checkpoint={"monitor": "eval/acc"}))


def test_the_constructor_and_assignments_raise_config_error_too() -> None:
    with pytest.raises(ConfigError, match=r"RunConfig: invalid config: train.epochs: Input should be greater than or "
                                          r"equal to 1 \(got 0\)"):
        RunConfig(train={"epochs": 0})
    with pytest.raises(ConfigError, match=r"RunConfig: invalid config: trian: unknown key, did you mean 'train'\?"):
        RunConfig(trian={})
    cfg = RunConfig()
    with pytest.raises(ConfigError, match=r"TrainConfig: invalid config: epochs: Input should be greater than or "
                                          r"equal to 1 \(got 0\)"):
        cfg.train.epochs = 0
    assert cfg.train.epochs == 10  # a refused assignment changes nothing
