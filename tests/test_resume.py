"""Exact resume in process: crash by exception at a chosen moment, resume in a new Trainer, compare bit for bit.

Every resume asserts where it started (phase, epoch, optimizer step): a resume that silently restarted
from scratch would also end bitwise equal, and the "no checkpoint yet" warning is an error in this suite.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from examples.digits import make_model
from phasetrain import Callback, CheckpointError, ConfigError, RunInterrupted, Trainer
from phasetrain.checkpoint_files import crc32
from tests.conftest import ResumePoint, digits, digits_config, records_without_times

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def crash_then_resume(trainer_for: Callable[..., Trainer], crash: Callback
                      ) -> tuple[Trainer, Trainer, tuple[str, int, int, bool] | None]:
    """Run ``trainer_for("a")`` through, ``trainer_for("b", crash)`` until it crashes, then resume "b" in a
    new trainer: returns the reference, the resumed trainer and the (phase, epoch, step, resumed) it
    started at."""
    reference = trainer_for("a")
    reference.run()
    with pytest.raises(Crash):
        trainer_for("b", crash).run()
    point = ResumePoint()
    resumed = trainer_for("b", point)
    resumed.run(resume="latest")
    return reference, resumed, point.at


def resume(config: Any, **kwargs: Any) -> tuple[Trainer, tuple[str, int, int, bool] | None]:
    """Resume ``config``'s run in a new Trainer; returns it and the (phase, epoch, step, resumed) it started at."""
    point = ResumePoint()
    trainer = Trainer(config, callbacks=[point], **kwargs)
    trainer.run(resume="latest")
    return trainer, point.at


@pytest.mark.parametrize(("crash", "resumed_at"), [(CrashAt(step=20), ("train_epoch", 2, 16, True)),
                                                   (CrashAt(epoch_start=3), ("checkpoint", 2, 20, True))],
                         ids=["mid-epoch", "epoch-boundary"])
def test_resume_with_workers_dropout_and_accumulation(tmp_path: pathlib.Path, crash: CrashAt,
                                                      resumed_at: tuple[str, int, int, bool]) -> None:
    # 1259 samples at 64: 20 batches, 10 steps an epoch; checkpoints every 4 steps and every epoch.
    sections = {"model": {"args": {"hidden": 32, "dropout": 0.3}},
                "train": {"epochs": 4, "num_workers": 2, "grad_accum_steps": 2, "batch_size": 64},
                "checkpoint": {"every_epochs": 1, "every_steps": 4, "keep_last": 1}}
    reference = Trainer(digits_config(tmp_path / "a", **sections))
    reference.run()

    config = digits_config(tmp_path / "b", **sections)
    with pytest.raises(Crash):
        Trainer(config, callbacks=[crash]).run()
    torch.manual_seed(12345)  # the crashed process's RNG is elsewhere now: resume must restore it
    resumed, at = resume(config)
    assert at == resumed_at
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))
    assert resumed.run_history.state_dict() == reference.run_history.state_dict()


class HookLog(Callback):
    """Every phase enter/exit, in order."""

    def __init__(self, phases: tuple[str, ...] = ("setup", "train_epoch", "eval_epoch", "checkpoint")) -> None:
        self.events: list[str] = []
        for phase in phases:
            setattr(self, f"on_enter_{phase}", lambda trainer, p=phase: self.events.append(f"enter {p}"))
            setattr(self, f"on_exit_{phase}", lambda trainer, p=phase: self.events.append(f"exit {p}"))
        self.on_enter_done = lambda trainer: self.events.append("enter done")


@pytest.mark.parametrize(("crash", "first"), [(CrashAt(step=50), "train_epoch"), (CrashAt(epoch_start=2), "checkpoint")],
                         ids=["inside-a-phase", "after-a-completed-phase"])
def test_a_resumed_run_re_enters_its_phase_so_enter_and_exit_hooks_pair_up(tmp_path: pathlib.Path, crash: CrashAt,
                                                                           first: str) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 2},
                           checkpoint={"every_epochs": 1, "every_steps": 45, "keep_last": 1})
    with pytest.raises(Crash):
        Trainer(config, callbacks=[crash]).run()
    log = HookLog()
    Trainer(config, callbacks=[log]).run(resume="latest")
    assert log.events[:2] == [f"enter {first}", f"exit {first}"]
    entered: list[str] = []
    for event in log.events:  # every exit follows its own enter, in this process
        kind, phase = event.split()
        if kind == "enter":
            entered.append(phase)
        else:
            assert entered and entered.pop() == phase, log.events
    assert log.events[-1] == "enter done"


def test_the_progress_bar_of_a_resumed_epoch_starts_at_the_steps_already_done(tmp_path: pathlib.Path) -> None:
    from phasetrain import ProgressBar

    class Starts(ProgressBar):
        def __init__(self) -> None:
            super().__init__()
            self.starts: list[tuple[int, int | None]] = []

        def on_enter_train_epoch(self, trainer: Trainer) -> None:
            super().on_enter_train_epoch(trainer)
            assert self._bar is not None
            self.starts.append((self._bar.n, self._bar.total))

    config = digits_config(tmp_path / "run", train={"epochs": 2, "progress_bar": True},
                           checkpoint={"every_epochs": 0, "every_steps": 25, "keep_last": 1})
    with pytest.raises(Crash):
        Trainer(config, callbacks=[CrashAt(step=60)]).run()
    bar = Starts()
    Trainer(config, callbacks=[bar]).run(resume="latest")
    assert bar.starts == [(10, 40)]  # resumed at step 50: 10 of epoch 2's 40 steps done


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_is_exact_with_random_augmentation_in_workers(tmp_path: pathlib.Path, workers: int) -> None:
    train = Augmented(digits()["train"])
    sections = {"data": None, "train": {"epochs": 2, "num_workers": workers},
                "checkpoint": {"every_epochs": 0, "every_steps": 7, "keep_last": 1}}
    reference = Trainer(digits_config(tmp_path / "a", **sections), train_data=train)
    reference.run()
    config = digits_config(tmp_path / "b", **sections)
    with pytest.raises(Crash):
        Trainer(config, train_data=train, callbacks=[CrashAt(step=17)]).run()
    resumed, at = resume(config, train_data=train)
    assert at == ("train_epoch", 1, 14, True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))


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


@pytest.mark.parametrize(("log_every", "every_steps", "crash_step", "resumed_step"), [(10, 4, 17, 16), (5, 3, 7, 6)])
def test_metrics_file_after_a_resume_equals_the_uninterrupted_one(tmp_path: pathlib.Path, log_every: int,
                                                                  every_steps: int, crash_step: int,
                                                                  resumed_step: int) -> None:
    sections = {"train": {"epochs": 2, "log_every_steps": log_every},
                "checkpoint": {"every_epochs": 0, "every_steps": every_steps, "keep_last": 1}}
    Trainer(digits_config(tmp_path / "a", **sections)).run()
    config = digits_config(tmp_path / "b", **sections)
    with pytest.raises(Crash):
        Trainer(config, callbacks=[CrashAt(step=crash_step)]).run()
    _, at = resume(config)
    assert at == ("train_epoch", 1, resumed_step, True)
    assert records_without_times(tmp_path / "b") == records_without_times(tmp_path / "a")


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

    reference, resumed, at = crash_then_resume(trainer_for, CrashAt(step=55))
    assert at == ("train_epoch", 2, 50, True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))


class TermAt(Callback):
    """Sends this process a SIGTERM after optimizer step ``step``, as a scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.state.optimizer_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_mid_epoch_checkpoints_at_that_very_step_and_the_resume_is_exact(tmp_path: pathlib.Path) -> None:
    sections = {"model": {"args": {"hidden": 32, "dropout": 0.3}}, "train": {"epochs": 2},
                "checkpoint": {"every_epochs": 1, "keep_last": 5}}
    reference = Trainer(digits_config(tmp_path / "a", **sections))
    reference.run()
    config = digits_config(tmp_path / "b", **sections)
    with pytest.raises(RunInterrupted, match="SIGTERM received: saved .*epoch002-step0000057-train_epoch; resume with"):
        Trainer(config, callbacks=[TermAt(57)]).run()
    resumed, at = resume(config)
    assert at == ("train_epoch", 2, 57, True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))


def test_a_custom_phase_keeps_its_state_across_a_resume(tmp_path: pathlib.Path) -> None:
    from phasetrain import Phase

    class Visits(Phase):
        """Counts its own runs and logs the count: state a checkpoint must carry."""

        name = "visits"

        def __init__(self) -> None:
            self.runs = 0

        def run(self, trainer: Trainer) -> None:
            self.runs += 1
            trainer.log({"visits/runs": float(self.runs)})

        def state_dict(self) -> dict[str, Any]:
            return {"runs": self.runs}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.runs = state["runs"]

    def trainer_for(name: str, *callbacks: Callback) -> Trainer:
        trainer = Trainer(digits_config(tmp_path / name, train={"epochs": 4},
                                        checkpoint={"every_epochs": 1, "every_steps": 30, "keep_last": 2}),
                          callbacks=list(callbacks))
        trainer.add_phase(Visits(), after="eval_epoch")
        return trainer

    reference, resumed, at = crash_then_resume(trainer_for, CrashAt(step=100))
    assert at == ("train_epoch", 3, 90, True)
    assert resumed.run_history.get_metric_values("visits/runs") == [1.0, 2.0, 3.0, 4.0]
    assert resumed.run_history.state_dict() == reference.run_history.state_dict()


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.state.optimizer_step == self.step:
            trainer.request_stop("enough")


class CrashOnStoppedEpochRecord(Callback):
    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["kind"] == "epoch" and record["phase"] == "train_epoch" and record["step"] == 50:
            raise Crash  # after the step-50 checkpoint, when the stopped epoch logs


def test_a_stop_requested_at_a_checkpointed_step_still_ends_the_resumed_epoch_there(tmp_path: pathlib.Path) -> None:
    # The checkpoint at step 50 holds the stop request and an unfinished epoch: the resume must not train on.
    sections = {"train": {"epochs": 3}, "checkpoint": {"every_epochs": 0, "every_steps": 50, "keep_last": 1}}
    reference = Trainer(digits_config(tmp_path / "a", **sections), callbacks=[StopAt(50)])
    reference.run()
    config = digits_config(tmp_path / "b", **sections)
    with pytest.raises(Crash):
        Trainer(config, callbacks=[StopAt(50), CrashOnStoppedEpochRecord()]).run()
    resumed, at = resume(config)
    assert at == ("train_epoch", 2, 50, True)
    assert resumed.state.optimizer_step == reference.state.optimizer_step == 50
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))
    assert records_without_times(tmp_path / "b") == records_without_times(tmp_path / "a")


def test_a_phase_that_saves_as_its_last_act_is_not_run_again_on_resume(tmp_path: pathlib.Path) -> None:
    from phasetrain import Phase

    class PerturbThenSave(Phase):
        name = "perturb"

        def run(self, trainer: Trainer) -> None:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)  # global-RNG noise: doing it twice would show
            trainer.save_checkpoint(phase_finished=True)

    def trainer_for(name: str, *callbacks: Callback) -> Trainer:
        trainer = Trainer(digits_config(tmp_path / name, train={"epochs": 2}, checkpoint={"every_epochs": 0}),
                          callbacks=list(callbacks))
        trainer.add_phase(PerturbThenSave(), after="train_epoch")
        return trainer

    reference, resumed, at = crash_then_resume(trainer_for, CrashAt(epoch_start=2))
    assert at == ("perturb", 1, 40, True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))


def test_a_callback_state_that_would_not_load_back_is_refused_when_saving(tmp_path: pathlib.Path) -> None:
    import numpy as np

    class Best(Callback):
        def __init__(self) -> None:
            self.best: object = None

        def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
            if "eval/loss" in record:
                self.best = np.float64(record["eval/loss"])  # subclasses float, but weights_only cannot load it

        def state_dict(self) -> dict[str, Any]:
            return {"best": self.best}

    config = digits_config(tmp_path / "run", train={"epochs": 1}, checkpoint={"every_epochs": 1})
    with pytest.raises(CheckpointError, match=r"cannot checkpoint Best.state_dict\(\)\['best'\]: a numpy.float64 is "
                                              r"not plain data; .*convert it, e.g. float\(value\)"):
        Trainer(config, callbacks=[Best()]).run()
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))  # nothing half-written


# ---- bad checkpoints --------------------------------------------------------------------------------

@pytest.fixture
def crashed_run(tmp_path: pathlib.Path) -> pathlib.Path:
    """A run stopped at step 12 with checkpoints at steps 4, 8 and 12 (all kept)."""
    with pytest.raises(Crash):
        Trainer(crashed_config(tmp_path / "run"), callbacks=[CrashAt(step=13)]).run()
    return tmp_path / "run"


def crashed_config(run_dir: pathlib.Path, **sections: Any) -> Any:
    defaults = {"train": {"epochs": 2}, "checkpoint": {"every_steps": 4, "keep_last": 5, "every_epochs": 0}}
    return digits_config(run_dir, **{**defaults, **sections})


def checkpoint_at(run_dir: pathlib.Path, step: int) -> pathlib.Path:
    return next((run_dir / "checkpoints").glob(f"epoch*-step{step:07d}-*"))


def test_corrupted_latest_falls_back_to_the_newest_intact_one(crashed_run: pathlib.Path) -> None:
    weights_file = checkpoint_at(crashed_run, 12) / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-10] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match its checksum \(corrupted\)"):
        Trainer(crashed_config(crashed_run)).run(resume=checkpoint_at(crashed_run, 12))
    with pytest.warns(UserWarning, match="resuming from epoch001-step0000008-train_epoch, the newest intact"):
        _, at = resume(crashed_config(crashed_run))
    assert at == ("train_epoch", 1, 8, True)


def test_truncated_checkpoint_is_named(crashed_run: pathlib.Path) -> None:
    state_file = checkpoint_at(crashed_run, 12) / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"state.pt is 100 bytes, manifest says \d+ \(truncated"):
        Trainer(crashed_config(crashed_run)).run(resume=checkpoint_at(crashed_run, 12))


def test_resuming_with_a_change_the_checkpoint_cannot_carry_is_refused(crashed_run: pathlib.Path) -> None:
    # The saved position counts batches of 32: with 16 the resumed epoch would silently be another one.
    before = {p.name: p.stat().st_mtime_ns for p in crashed_run.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(ConfigError, match=r"differs from checkpoint epoch001-step0000012-train_epoch's in "
                                          r"train.batch_size 32 -> 16, which a resumed run cannot change"):
        resume(crashed_config(crashed_run, train={"epochs": 2, "batch_size": 16}))
    assert {p.name: p.stat().st_mtime_ns for p in crashed_run.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_checkpoint_of_another_model_is_refused_with_the_mismatching_keys(crashed_run: pathlib.Path) -> None:
    # A model given as an object: the config cannot show the change, the checkpoint's keys and shapes do.
    trainer = Trainer(crashed_config(crashed_run), model=make_model(hidden=48, dropout=0.0))
    with pytest.raises(CheckpointError, match=r"does not match the configured model Sequential: shape mismatches "
                                              r"\[0.bias: checkpoint \(64,\) vs model \(48,\); "
                                              r"0.weight: checkpoint \(64, 64\) vs model \(48, 64\)"):
        trainer.run(resume="latest")


def test_a_checkpoint_of_another_format_version_is_refused(crashed_run: pathlib.Path) -> None:
    state_file = checkpoint_at(crashed_run, 12) / "state.json"
    saved = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**saved, "format_version": 1, "phasetrain_version": "0.0.9"}))
    resign(checkpoint_at(crashed_run, 12), "state.json")
    with pytest.raises(CheckpointError, match=r"has format 1 \(written by phasetrain 0.0.9\); phasetrain .* reads "
                                              r"format 3: resume it with the phasetrain version that wrote it"):
        Trainer(crashed_config(crashed_run)).run(resume=checkpoint_at(crashed_run, 12))


def resign(checkpoint: pathlib.Path, name: str) -> None:
    """Rewrite the manifest entry of ``name`` so the checksum passes (as someone who edits a file could)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = {"crc32": crc32(checkpoint / name), "size": (checkpoint / name).stat().st_size}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


class Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(os.environ["EXPLOIT_MARKER"]),))


def test_a_pickle_with_code_in_it_is_not_executed(crashed_run: pathlib.Path, tmp_path: pathlib.Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    checkpoint = checkpoint_at(crashed_run, 12)
    torch.save({"optimizer": {"state": {}, "param_groups": [], "payload": Exploit()}}, checkpoint / "state.pt")
    resign(checkpoint, "state.pt")  # the checksum passes: the loader itself must refuse the code
    with pytest.raises(CheckpointError, match="cannot load .*state.pt as plain tensors and data"):
        Trainer(crashed_config(crashed_run)).run(resume=checkpoint)
    assert not marker.exists()


def test_resuming_a_finished_run_says_so_and_does_nothing(tmp_path: pathlib.Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 1}, checkpoint={"every_epochs": 1})
    Trainer(config).run()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    Trainer(config).run(resume="latest")
    assert "is finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_resume_before_the_first_checkpoint_warns_and_starts_over_in_the_same_folder(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 1}, checkpoint={"every_epochs": 1})
    with pytest.raises(Crash):
        Trainer(config, callbacks=[CrashAt(step=3)]).run()
    with pytest.warns(UserWarning, match="no checkpoint in .* yet: starting the run from the beginning"):
        _, at = resume(config)
    assert at == ("setup", 0, 0, False)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_phasetrain_resume_cli_continues_from_the_run_folder(crashed_run: pathlib.Path) -> None:
    shutil.rmtree(checkpoint_at(crashed_run, 12))  # latest now points at nothing: falls back with a warning
    result = subprocess.run([sys.executable, "-m", "phasetrain.cli", "resume", str(crashed_run)],
                            check=False, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "newest intact checkpoint" in result.stderr
    assert f"resuming {crashed_run} from epoch001-step0000008-train_epoch: epoch 1, step 8" in result.stdout
    assert (crashed_run / "model.safetensors").is_file()


def test_an_epoch_checkpoint_is_not_rewritten_on_resume_and_an_aside_copy_still_counts(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 3},
                           checkpoint={"every_epochs": 1, "keep_last": 5, "keep_best": 0})
    with pytest.raises(Crash):
        Trainer(config, callbacks=[CrashAt(epoch_start=2)]).run()
    checkpoints = tmp_path / "run" / "checkpoints"
    (only,) = [p for p in checkpoints.iterdir() if p.is_dir()]
    # A crash between moving an old copy aside and renaming its replacement in leaves just the old copy.
    shutil.copytree(tmp_path / "run", tmp_path / "aside")
    (tmp_path / "aside" / "checkpoints" / only.name).rename(tmp_path / "aside" / "checkpoints" / f".old-{only.name}")
    with pytest.warns(UserWarning, match=f"resuming from .old-{only.name}, the newest intact"):
        _, at = resume(digits_config(tmp_path / "aside", train={"epochs": 3},
                                     checkpoint={"every_epochs": 1, "keep_last": 5, "keep_best": 0}))
    assert at == ("checkpoint", 1, 40, True)
    written = (only / "manifest.json").stat().st_mtime_ns
    _, at = resume(config)
    assert at == ("checkpoint", 1, 40, True)
    assert (only / "manifest.json").stat().st_mtime_ns == written  # resumed after it, not through it again


@pytest.mark.parametrize("accumulation", [1, 3])
def test_checkpoint_inside_an_optimizer_step_is_refused(tmp_path: pathlib.Path, accumulation: int) -> None:
    class SaveMidGroup(Callback):
        def on_after_backward(self, trainer: Trainer) -> None:  # the gradients of the step are not saved
            trainer.save_checkpoint()

    config = digits_config(tmp_path / "run", train={"grad_accum_steps": accumulation})
    with pytest.raises(CheckpointError, match=r"in the middle of an optimizer step \(micro-batch 1 of it has started\)"):
        Trainer(config, callbacks=[SaveMidGroup()]).run()
