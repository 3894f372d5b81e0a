"""Exact resume: kill a run anywhere, resume it, and get the uninterrupted run's weights bit for bit."""
from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from phasetrain import Callback, CheckpointError, Trainer
from phasetrain.checkpoint import verify
from tests.conftest import digits_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Dropout, shuffling, accumulation with a short last group (40 batches -> 13 steps of 3 + 1 of 1),
# an LR schedule stepped per optimizer step, mid-epoch checkpoints every 5 steps.
JOB: dict[str, Any] = {
    "seed": 3,
    "model": {"target": "examples.digits:make_model", "args": {"hidden": 64, "dropout": 0.2}},
    "data": {"target": "examples.digits:make_data"},
    "loss": "torch.nn:CrossEntropyLoss",
    "optimizer": {"target": "torch.optim:AdamW", "args": {"lr": 0.003}},
    "scheduler": {"target": "torch.optim.lr_scheduler:StepLR", "args": {"step_size": 7, "gamma": 0.9}},
    "metrics": {"accuracy": {"target": "torchmetrics.classification:MulticlassAccuracy",
                             "args": {"num_classes": 10, "average": "micro"}}},
    "train": {"epochs": 6, "batch_size": 32, "grad_accum_steps": 3, "progress_bar": False},
    "checkpoint": {"every_epochs": 1, "every_steps": 5, "keep_last": 2, "keep_best": 1, "monitor": "eval/accuracy",
                   "mode": "max"},
}


def start(run_dir: pathlib.Path, resume: bool = False, crash_in_save: int | None = None) -> subprocess.Popen[str]:
    """``phasetrain run JOB run_dir=RUN_DIR`` (or ``phasetrain resume RUN_DIR``) in a new process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if crash_in_save:
        env["PHASETRAIN_TEST_CRASH_IN_SAVE"] = str(crash_in_save)
    config_file = run_dir.parent / "job.yaml"
    config_file.write_text(yaml.safe_dump(JOB))
    args = ["resume", str(run_dir)] if resume else ["run", str(config_file), f"run_dir={run_dir}"]
    return subprocess.Popen([sys.executable, "-m", "tests.resume_job", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str]) -> int:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode in (0, -signal.SIGKILL, 143), stderr
    return process.returncode


def wait_for_checkpoints(run_dir: pathlib.Path, count: int, process: subprocess.Popen[str]) -> None:
    """Block until the run has written ``count`` more checkpoints (the ``latest`` pointer changed)."""
    pointer = run_dir / "checkpoints" / "latest"
    seen = pointer.read_text() if pointer.exists() else None
    changes = 0
    while changes < count:
        assert process.poll() is None, "the run ended before the kill"
        current = pointer.read_text() if pointer.exists() else None
        if current != seen:
            seen, changes = current, changes + 1
        time.sleep(0.005)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert finish(start(run_dir)) == 0
    return run_dir


def final_state(run_dir: pathlib.Path) -> tuple[dict[str, torch.Tensor], Any]:
    last = max((run_dir / "checkpoints").glob("epoch006-*-checkpoint"))
    return load_file(str(run_dir / "model.safetensors")), torch.load(last / "optimizer.pt", weights_only=True)


def assert_bitwise_equal(run_dir: pathlib.Path, reference: pathlib.Path) -> None:
    weights, optimizer = final_state(run_dir)
    ref_weights, ref_optimizer = final_state(reference)
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], ref_weights[key]), key
    for index, param_state in ref_optimizer["state"].items():
        for name, value in param_state.items():
            assert torch.equal(optimizer["state"][index][name], value), (index, name)
    assert optimizer["param_groups"] == ref_optimizer["param_groups"]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert rows == (reference / "metrics.jsonl").read_text().splitlines()


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(tmp_path: pathlib.Path,
                                                                    uninterrupted: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    rng = random.Random(0)
    process = start(run_dir)
    for kill in range(3):
        wait_for_checkpoints(run_dir, rng.randint(1, 6), process)
        time.sleep(rng.uniform(0, 0.05))  # land anywhere: mid-step, mid-eval, mid-checkpoint-write
        process.kill()
        finish(process)
        process = start(run_dir, resume=True)
    assert finish(process) == 0
    assert_bitwise_equal(run_dir, uninterrupted)


def test_sigterm_finishes_the_step_checkpoints_and_exits_with_a_resume_hint(tmp_path: pathlib.Path,
                                                                             uninterrupted: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    process = start(run_dir)
    wait_for_checkpoints(run_dir, 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143 and f"resume with 'phasetrain resume {run_dir}'" in stderr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    verify(run_dir / "checkpoints" / latest)
    assert finish(start(run_dir, resume=True)) == 0
    assert_bitwise_equal(run_dir, uninterrupted)


def test_a_crash_inside_the_checkpoint_write_leaves_the_previous_one_loadable(tmp_path: pathlib.Path,
                                                                              uninterrupted: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    assert finish(start(run_dir, crash_in_save=4)) == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    half_written = [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
    assert len(half_written) == 1
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    verify(latest)  # the third checkpoint (steps 5, 10, then epoch 1's end at 14), untouched by the crash
    assert latest.name == "epoch001-step0000014-checkpoint"
    assert finish(start(run_dir, resume=True)) == 0
    assert not any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())
    assert_bitwise_equal(run_dir, uninterrupted)


# ---- in-process resume: crash by exception at a chosen moment, resume in a new Trainer -----------------

class Crash(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, step: int | None = None, epoch_start: int | None = None) -> None:
        self.step, self.epoch_start = step, epoch_start

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.state.optimizer_step == self.step:
            raise Crash

    def on_enter_train_epoch(self, trainer: Trainer) -> None:
        if trainer.state.epoch == self.epoch_start:
            raise Crash


def weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()]


@pytest.mark.parametrize("crash", [CrashAt(step=20), CrashAt(epoch_start=3)], ids=["mid-epoch", "epoch-boundary"])
def test_resume_with_workers_dropout_and_accumulation(tmp_path: pathlib.Path, crash: CrashAt) -> None:
    sections = {"model": {"args": {"hidden": 32, "dropout": 0.3}},
                "train": {"epochs": 4, "num_workers": 2, "grad_accum_steps": 2, "batch_size": 64},
                "checkpoint": {"every_epochs": 1, "every_steps": 4, "keep_last": 1}}
    reference = Trainer(digits_config(tmp_path / "a", **sections))
    reference.run()

    config = digits_config(tmp_path / "b", **sections)
    with pytest.raises(Crash):
        Trainer(config, callbacks=[crash]).run()
    torch.manual_seed(12345)  # the crashed process's RNG is elsewhere now: resume must restore it
    resumed = Trainer(config)
    resumed.run(resume="latest")
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))
    assert resumed.run_history.state_dict() == reference.run_history.state_dict()


# ---- bad checkpoints --------------------------------------------------------------------------------

@pytest.fixture
def crashed_run(tmp_path: pathlib.Path) -> pathlib.Path:
    """A run stopped at step 12 with checkpoints at steps 4, 8 and 12 (all kept)."""
    config = digits_config(tmp_path / "run", train={"epochs": 2},
                           checkpoint={"every_steps": 4, "keep_last": 5, "every_epochs": 0})
    with pytest.raises(Crash):
        Trainer(config, callbacks=[CrashAt(step=13)]).run()
    return tmp_path / "run"


def checkpoint_at(run_dir: pathlib.Path, step: int) -> pathlib.Path:
    return next((run_dir / "checkpoints").glob(f"epoch*-step{step:07d}-*"))


def test_corrupted_latest_falls_back_to_the_newest_intact_one(crashed_run: pathlib.Path) -> None:
    weights_file = checkpoint_at(crashed_run, 12) / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-10] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    config = digits_config(crashed_run, train={"epochs": 2},
                           checkpoint={"every_steps": 4, "keep_last": 5, "every_epochs": 0})
    trainer = Trainer(config)
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match its checksum \(corrupted\)"):
        trainer.run(resume=checkpoint_at(crashed_run, 12))
    with pytest.warns(UserWarning, match="resuming from epoch001-step0000008-train_epoch, the newest intact"):
        trainer.checkpoints.load(trainer.checkpoints.find("latest"))
    assert trainer.state.optimizer_step == 8


def test_resuming_with_a_changed_config_warns_which_keys_differ(crashed_run: pathlib.Path) -> None:
    config = digits_config(crashed_run, train={"epochs": 2, "batch_size": 16},
                           checkpoint={"every_steps": 4, "keep_last": 5, "every_epochs": 0})
    trainer = Trainer(config)
    with pytest.warns(UserWarning, match=r"differs from the checkpoint's in \['train.batch_size'\]"):
        trainer.checkpoints.load(trainer.checkpoints.find("latest"))


def test_truncated_checkpoint_is_named(crashed_run: pathlib.Path) -> None:
    optimizer_file = checkpoint_at(crashed_run, 12) / "optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    trainer = Trainer(digits_config(crashed_run))
    with pytest.raises(CheckpointError, match=r"optimizer.pt is 100 bytes, manifest says \d+ \(truncated"):
        trainer.checkpoints.find(checkpoint_at(crashed_run, 12))


def test_checkpoint_of_another_model_is_refused_with_the_mismatching_keys(crashed_run: pathlib.Path) -> None:
    trainer = Trainer(digits_config(crashed_run, model={"args": {"hidden": 48}}))
    with pytest.raises(CheckpointError, match=r"does not match the configured model Sequential: shape mismatches "
                                              r"\[0.bias: checkpoint \(64,\) vs model \(48,\); "
                                              r"0.weight: checkpoint \(64, 64\) vs model \(48, 64\)"):
        trainer.run(resume="latest")


class Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(os.environ["EXPLOIT_MARKER"]),))


def test_a_pickle_with_code_in_it_is_not_executed(crashed_run: pathlib.Path, tmp_path: pathlib.Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    checkpoint = checkpoint_at(crashed_run, 12)
    torch.save({"state": {}, "param_groups": [], "payload": Exploit()}, checkpoint / "optimizer.pt")
    # Re-sign the manifest so the checksum passes: the loader itself must refuse the code.
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    from phasetrain.checkpoint import _crc32
    manifest["files"]["optimizer.pt"] = {"crc32": _crc32(checkpoint / "optimizer.pt"),
                                         "size": (checkpoint / "optimizer.pt").stat().st_size}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    trainer = Trainer(digits_config(crashed_run))
    with pytest.raises(CheckpointError, match="cannot load .*optimizer.pt as plain tensors and data"):
        trainer.run(resume=checkpoint)
    assert not marker.exists()


def test_resuming_a_finished_run_says_so_and_does_nothing(tmp_path: pathlib.Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 1}, checkpoint={"every_epochs": 1})
    Trainer(config).run()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    Trainer(config).run(resume="latest")
    assert "is finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_retention_keeps_the_newest_and_the_best(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 5},
                           checkpoint={"every_epochs": 1, "keep_last": 2, "keep_best": 1, "monitor": "eval/loss"})
    trainer = Trainer(config)
    history = trainer.run()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    losses = history.get_metric_values("eval/loss")
    best_epoch = losses.index(min(losses)) + 1
    steps = trainer.steps_per_epoch
    expected = {f"epoch{e:03d}-step{e * steps:07d}-checkpoint" for e in (4, 5, best_epoch)}
    assert set(kept) == expected
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"epoch005-step{5 * steps:07d}-checkpoint"


def test_phasetrain_resume_cli_continues_from_the_run_folder(crashed_run: pathlib.Path) -> None:
    shutil.rmtree(checkpoint_at(crashed_run, 12))  # latest now points at nothing: falls back with a warning
    result = subprocess.run([sys.executable, "-m", "phasetrain.cli", "resume", str(crashed_run)],
                            check=False, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "newest intact checkpoint" in result.stderr
    assert (crashed_run / "model.safetensors").is_file()


class Augmented(torch.utils.data.Dataset):
    """Digits with random noise drawn in __getitem__ from torch, numpy and python RNGs (in the workers)."""

    def __init__(self, base: torch.utils.data.TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import random as python_random

        import numpy as np
        pixels, label = self.base[index]
        noise = torch.rand(64) * 0.05 + float(np.random.rand()) * 0.01 + python_random.random() * 0.01
        return pixels + noise, label


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_is_exact_with_random_augmentation_in_workers(tmp_path: pathlib.Path, workers: int) -> None:
    from tests.conftest import digits
    data = digits()
    train = Augmented(data["train"])
    sections = {"data": None, "train": {"epochs": 2, "num_workers": workers},
                "checkpoint": {"every_epochs": 0, "every_steps": 7, "keep_last": 1}}
    reference = Trainer(digits_config(tmp_path / "a", **sections), train_data=train)
    reference.run()
    config = digits_config(tmp_path / "b", **sections)
    with pytest.raises(Crash):
        Trainer(config, train_data=train, callbacks=[CrashAt(step=17)]).run()  # resumes from step 14
    resumed = Trainer(config, train_data=train)
    resumed.run(resume="latest")
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))


@pytest.mark.parametrize(("log_every", "every_steps", "crash_step"), [(10, 4, 17), (5, 3, 7)])
def test_metrics_file_after_a_resume_equals_the_uninterrupted_one(tmp_path: pathlib.Path, log_every: int,
                                                                  every_steps: int, crash_step: int) -> None:
    sections = {"train": {"epochs": 2, "log_every_steps": log_every},
                "checkpoint": {"every_epochs": 0, "every_steps": every_steps, "keep_last": 1}}
    Trainer(digits_config(tmp_path / "a", **sections)).run()
    config = digits_config(tmp_path / "b", **sections)
    with pytest.raises(Crash):
        Trainer(config, callbacks=[CrashAt(step=crash_step)]).run()
    Trainer(config).run(resume="latest")
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == (tmp_path / "a" / "metrics.jsonl").read_text()


def test_resume_restores_which_parameters_a_phase_unfroze(tmp_path: pathlib.Path) -> None:
    from phasetrain import Phase, on_epoch

    class Unfreeze(Phase):
        name = "unfreeze"
        when = on_epoch(1)

        def run(self, trainer: Trainer) -> None:
            for p in trainer.accelerator.unwrap_model(trainer.model).parameters():
                p.requires_grad_(True)

    def trainer_for(name: str, *callbacks: Callback) -> Trainer:
        config = digits_config(tmp_path / name, train={"epochs": 2},
                               checkpoint={"every_epochs": 0, "every_steps": 10, "keep_last": 1})
        trainer = Trainer(config, callbacks=list(callbacks))
        trainer.model[0].weight.requires_grad_(False)  # the first layer starts frozen
        trainer.add_phase(Unfreeze(), after="train_epoch")
        return trainer

    reference = trainer_for("a")
    reference.run()
    with pytest.raises(Crash):
        trainer_for("b", CrashAt(step=55)).run()
    resumed = trainer_for("b")
    resumed.run(resume="latest")
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))


def test_an_epoch_checkpoint_is_not_rewritten_on_resume_and_an_aside_copy_still_counts(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 3},
                           checkpoint={"every_epochs": 1, "keep_last": 5, "keep_best": 0})
    with pytest.raises(Crash):
        Trainer(config, callbacks=[CrashAt(epoch_start=2)]).run()
    checkpoints = tmp_path / "run" / "checkpoints"
    (only,) = [p for p in checkpoints.iterdir() if p.is_dir()]
    # A crash between moving an old copy aside and renaming its replacement in leaves just the old copy.
    only.rename(checkpoints / f".old-{only.name}")
    trainer = Trainer(config)
    with pytest.warns(UserWarning, match="newest intact"):
        found = trainer.checkpoints.find("latest")
    assert found.name == f".old-{only.name}"
    (checkpoints / f".old-{only.name}").rename(only)
    written = (only / "manifest.json").stat().st_mtime_ns
    Trainer(config).run(resume="latest")
    assert (only / "manifest.json").stat().st_mtime_ns == written  # resumed after it, not through it again


def test_keep_best_ranks_only_checkpoints_taken_right_after_an_evaluation(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 3},
                           checkpoint={"every_epochs": 1, "every_steps": 15, "keep_last": 1, "keep_best": 1,
                                       "monitor": "eval/accuracy", "mode": "max"})
    history = Trainer(config).run()
    accuracies = history.get_metric_values("eval/accuracy")
    best_epoch = accuracies.index(max(accuracies)) + 1
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    assert f"epoch{best_epoch:03d}-step{best_epoch * 40:07d}-checkpoint" in kept
    assert len(kept) <= 2 and all(name.endswith("-checkpoint") or name == kept[-1] for name in kept)


def test_checkpoint_inside_an_accumulation_group_is_refused(tmp_path: pathlib.Path) -> None:
    class SaveMidGroup(Callback):
        def on_after_backward(self, trainer: Trainer) -> None:
            trainer.save_checkpoint()

    config = digits_config(tmp_path / "run", train={"grad_accum_steps": 3})
    with pytest.raises(CheckpointError, match=r"inside a gradient-accumulation group \(micro-step 1 of 3\)"):
        Trainer(config, callbacks=[SaveMidGroup()]).run()
