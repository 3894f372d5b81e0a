"""Checkpoints written in the background: the loop pays for a snapshot, the guarantees stay as they were.

The write is made slow on purpose by ``SlowDisk``, which holds each checkpoint's write (the sealing of its
files: serialising, checksums, fsync) until the test lets it go, then takes ``delay`` seconds more. It wraps
phasetrain's own ``seal``; torch, safetensors and the file system do the real work.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import phasetrain.checkpoint
from phasetrain import Callback, CheckpointError, RunInterrupted, Trainer
from phasetrain.checkpoint import intact
from phasetrain.run_folder import RunFolder, read_latest
from tests.conftest import PhaseRecorder, ResumePoint, digits_config
from tests.test_resume import Crash, CrashAt, TermAt, weights

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One epoch of 40 optimizer steps, a checkpoint every 4, all kept.
SECTIONS: dict[str, Any] = {"train": {"epochs": 1}, "checkpoint": {"every_steps": 4, "keep_last": 20, "every_epochs": 0}}


def config_for(run_dir: pathlib.Path, **sections: Any) -> Any:
    return digits_config(run_dir, **{**SECTIONS, **sections})


def checkpoint_at(run_dir: pathlib.Path, step: int) -> pathlib.Path:
    return run_dir / "checkpoints" / f"epoch001-step{step:07d}-train_epoch"


class SlowDisk:
    """Holds every checkpoint write until ``release()``, then makes it take ``delay`` seconds more; records
    which thread wrote each checkpoint and when its write began and ended."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> None:
        self.released, self.delay = threading.Event(), delay
        self.writes: list[tuple[str, str, float, float]] = []  # (checkpoint, thread, start, end)
        real_seal = phasetrain.checkpoint.seal

        def seal(folder: pathlib.Path, files: Iterable[pathlib.Path]) -> None:
            start = time.perf_counter()
            assert self.released.wait(timeout=60), "the test never released the write"
            time.sleep(self.delay)
            real_seal(folder, files)
            self.writes.append((folder.name.removeprefix(".tmp-"), threading.current_thread().name, start,
                                time.perf_counter()))

        monkeypatch.setattr(phasetrain.checkpoint, "seal", seal)

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> SlowDisk:
    return SlowDisk(monkeypatch)


class Watch(Callback):
    """At each optimizer step: the model's weights, and what the checkpoints folder shows at that moment."""

    def __init__(self, release_at: int | None = None, disk: SlowDisk | None = None) -> None:
        self.release_at, self.disk = release_at, disk
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.seen: dict[int, tuple[list[str], str | None]] = {}

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        step = trainer.state.optimizer_step
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.weights[step] = {name: value.clone() for name, value in model.state_dict().items()}
        folder = trainer.run_folder.checkpoints
        latest = read_latest(folder)
        present = sorted(p.name for p in folder.iterdir() if p.name != "latest") if folder.is_dir() else []
        self.seen[step] = (present, latest.name if latest else None)
        if step == self.release_at and self.disk is not None:
            self.disk.release()


def test_training_goes_on_while_a_checkpoint_is_written_and_the_checkpoint_holds_the_saved_step(
        tmp_path: pathlib.Path, slow_disk: SlowDisk) -> None:
    run_dir = tmp_path / "run"
    watch = Watch(release_at=6, disk=slow_disk)
    Trainer(config_for(run_dir), callbacks=[watch]).run()
    # Steps 5 and 6 ran while step 4's checkpoint was held: only its half-written folder existed, latest named nothing.
    assert watch.seen[5] == ([f".tmp-{checkpoint_at(run_dir, 4).name}"], None)
    assert watch.seen[6] == watch.seen[5]
    assert all(thread.startswith("phasetrain-checkpoint") for _, thread, _, _ in slow_disk.writes)
    # The checkpoint holds the weights of step 4, not those of the steps trained while it was written.
    saved = load_file(str(checkpoint_at(run_dir, 4) / "model.safetensors"))
    assert sorted(saved) == sorted(watch.weights[4])
    assert all(torch.equal(watch.weights[4][name], value) for name, value in saved.items())
    assert not all(torch.equal(watch.weights[6][name], value) for name, value in saved.items())
    # One write at a time, in order, every one of them on disk and intact when run() returned.
    names = [name for name, _, _, _ in slow_disk.writes]
    assert names == [checkpoint_at(run_dir, step).name for step in range(4, 41, 4)]
    assert all(end <= start for (_, _, _, end), (_, _, start, _) in itertools.pairwise(slow_disk.writes))
    for name in names:
        intact(run_dir / "checkpoints" / name)
    assert read_latest(run_dir / "checkpoints") == checkpoint_at(run_dir, 40)


def test_the_next_checkpoint_waits_for_the_one_being_written(tmp_path: pathlib.Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    disk = SlowDisk(monkeypatch, delay=0.3)  # a write takes longer than the 4 steps to the next checkpoint
    disk.release()
    watch = Watch()
    Trainer(config_for(tmp_path / "run", train={"epochs": 1, "max_steps": 12}), callbacks=[watch]).run()
    writes = disk.writes
    assert [name for name, _, _, _ in writes] == [checkpoint_at(tmp_path / "run", s).name for s in (4, 8, 12)]
    assert all(end <= start for (_, _, _, end), (_, _, start, _) in itertools.pairwise(writes))
    # Step 9 ran only once step 8's checkpoint had a snapshot, taken after step 4's was on disk.
    assert checkpoint_at(tmp_path / "run", 4).name in watch.seen[9][0]


def test_run_returns_with_the_last_checkpoint_on_disk(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = SlowDisk(monkeypatch, delay=0.5)
    disk.release()
    run_dir = tmp_path / "run"
    Trainer(config_for(run_dir, train={"epochs": 1, "max_steps": 4})).run()
    assert read_latest(run_dir / "checkpoints") == checkpoint_at(run_dir, 4)
    intact(checkpoint_at(run_dir, 4))


def test_without_background_writes_save_returns_with_the_checkpoint_on_disk(tmp_path: pathlib.Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    disk = SlowDisk(monkeypatch)
    disk.release()
    watch = Watch()
    run_dir = tmp_path / "run"
    Trainer(config_for(run_dir, checkpoint={**SECTIONS["checkpoint"], "background": False}), callbacks=[watch]).run()
    assert watch.seen[5] == ([checkpoint_at(run_dir, 4).name], checkpoint_at(run_dir, 4).name)
    assert {thread for _, thread, _, _ in disk.writes} == {threading.main_thread().name}


class ReleaseLater(Callback):
    """Lets the held write go from another thread ``after`` seconds past optimizer step ``step``."""

    def __init__(self, disk: SlowDisk, step: int, after: float) -> None:
        self.disk, self.step, self.after = disk, step, after

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.state.optimizer_step == self.step:
            threading.Timer(self.after, self.disk.release).start()


def test_a_run_that_fails_finishes_the_checkpoint_it_was_writing_and_resumes_from_it(
        tmp_path: pathlib.Path, slow_disk: SlowDisk) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        Trainer(config_for(run_dir), callbacks=[ReleaseLater(slow_disk, step=5, after=0.3), CrashAt(step=6)]).run()
    assert read_latest(run_dir / "checkpoints") == checkpoint_at(run_dir, 4)
    point = ResumePoint()
    Trainer(config_for(run_dir), callbacks=[point]).run(resume="latest")
    assert point.at == ("train_epoch", 1, 4, True)


def test_a_failed_background_write_stops_the_run_naming_the_checkpoint(tmp_path: pathlib.Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"

    def failing_seal(folder: pathlib.Path, files: Iterable[pathlib.Path]) -> None:
        for _ in files:
            raise ValueError("the serialiser gave up")

    monkeypatch.setattr(phasetrain.checkpoint, "seal", failing_seal)
    watch = Watch()
    with pytest.raises(CheckpointError) as raised:
        Trainer(config_for(run_dir), callbacks=[watch]).run()
    assert str(raised.value) == (f"writing checkpoint {checkpoint_at(run_dir, 4)} failed (ValueError: the serialiser "
                                 "gave up); no checkpoint was written before")
    assert max(watch.seen) <= 8  # raised at the end of the epoch at the latest, here by the next checkpoint
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == []  # the half-written folder is gone


KILLED_WHILE_WRITING = """
import os, pathlib, sys
import phasetrain.checkpoint
from phasetrain import Callback, Trainer
from tests.test_background_checkpoints import config_for

run_dir = pathlib.Path(sys.argv[1])
real_seal = phasetrain.checkpoint.seal

def seal(folder, files):  # the step-8 checkpoint's files are half written when the process dies
    if "step0000008" in folder.name:
        next(iter(files))
        os.kill(os.getpid(), 9)
    real_seal(folder, files)

phasetrain.checkpoint.seal = seal
Trainer(config_for(run_dir)).run()
"""


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_and_the_resume_is_exact(
        tmp_path: pathlib.Path) -> None:
    reference = Trainer(config_for(tmp_path / "reference"))
    reference.run()
    run_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(run_dir)], cwd=ROOT, check=False,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert read_latest(run_dir / "checkpoints") == checkpoint_at(run_dir, 4)
    assert (run_dir / "checkpoints" / f".tmp-{checkpoint_at(run_dir, 8).name}" / "state.pt").is_file()
    point = ResumePoint()
    resumed = Trainer(config_for(run_dir), callbacks=[point])
    resumed.run(resume="latest")
    assert point.at == ("train_epoch", 1, 4, True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the next checkpoint cleared the killed write's folder


def test_the_manifest_is_the_last_file_a_background_write_makes(tmp_path: pathlib.Path, slow_disk: SlowDisk) -> None:
    slow_disk.release()
    run_dir = tmp_path / "run"
    Trainer(config_for(run_dir, train={"epochs": 1, "max_steps": 4})).run()
    checkpoint = checkpoint_at(run_dir, 4)
    listed = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in checkpoint.iterdir() if p.name != "manifest.json")


def tied_model() -> torch.nn.Module:
    """Two layers that share one weight (as a language model's embedding and output layer do)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    model[2].weight = model[0].weight
    return model


def test_a_snapshot_keeps_tied_weights_tied_and_the_resume_is_exact(tmp_path: pathlib.Path) -> None:
    def config(run_dir: pathlib.Path) -> Any:
        return config_for(run_dir, model={"target": "tests.test_background_checkpoints:tied_model", "args": {}})

    reference = Trainer(config(tmp_path / "reference"))
    reference.run()
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        Trainer(config(run_dir), callbacks=[CrashAt(step=6)]).run()
    # Written once, as safetensors writes the live model: a copy per name would save (and restore) two weights.
    assert sorted(load_file(str(checkpoint_at(run_dir, 4) / "model.safetensors"))) == [
        "0.bias", "0.weight", "2.bias", "4.bias", "4.weight"]
    resumed = Trainer(config(run_dir))
    resumed.run(resume="latest")
    model = resumed.accelerator.unwrap_model(resumed.model)
    assert model[2].weight is model[0].weight
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))


def test_a_failed_background_write_stops_the_run_at_the_end_of_the_phase_it_was_seen_in(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    in_epoch_2 = threading.Event()

    def failing_seal(folder: pathlib.Path, files: Iterable[pathlib.Path]) -> None:  # fails while epoch 2 trains
        assert in_epoch_2.wait(timeout=60)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    class Epoch2(Callback):
        def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
            if trainer.state.optimizer_step == 41:
                in_epoch_2.set()

    monkeypatch.setattr(phasetrain.checkpoint, "seal", failing_seal)
    phases = PhaseRecorder()
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError, match=f"^{os.strerror(errno.EIO).lower()} writing .*epoch001-step0000040-checkpoint"):
        Trainer(config_for(run_dir, train={"epochs": 3}, checkpoint={"every_epochs": 1}),
                callbacks=[phases, Epoch2()]).run()
    # Epoch 1's checkpoint failed while epoch 2 trained: the run stopped when that epoch's phase ended, not at
    # epoch 2's checkpoint, after an evaluation whose work would be lost anyway.
    assert phases.visited == ["setup", "train_epoch:1", "eval_epoch:1", "checkpoint:1", "train_epoch:2"]


def test_the_final_weights_are_written_once_the_last_checkpoint_is_on_disk(tmp_path: pathlib.Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The final weights mark the run finished (a resume of it does nothing): its last checkpoint and best
    # weights must be on disk by then, or a crash in between would leave a finished run without them.
    disk = SlowDisk(monkeypatch, delay=0.5)
    disk.release()
    run_dir = tmp_path / "run"
    latest_then: list[pathlib.Path | None] = []
    real_write = RunFolder.write_final_weights

    def write_final_weights(folder: RunFolder, *args: Any) -> None:
        latest_then.append(read_latest(folder.checkpoints))
        real_write(folder, *args)

    monkeypatch.setattr(RunFolder, "write_final_weights", write_final_weights)
    Trainer(config_for(run_dir, train={"epochs": 1}, checkpoint={"every_epochs": 1})).run()
    assert latest_then == [run_dir / "checkpoints" / "epoch001-step0000040-checkpoint"]


def test_a_checkpoint_written_while_training_went_on_resumes_exactly(tmp_path: pathlib.Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Step 4's checkpoint is written only after steps 5 and 6 changed the weights and AdamW's moments: what it
    # holds is the copy taken at step 4, every part of it, or the resume from it would not be exact.
    reference = Trainer(config_for(tmp_path / "reference"))
    reference.run()
    slow_disk = SlowDisk(monkeypatch)
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        Trainer(config_for(run_dir), callbacks=[Watch(release_at=6, disk=slow_disk), CrashAt(step=7)]).run()
    assert read_latest(run_dir / "checkpoints") == checkpoint_at(run_dir, 4)
    point = ResumePoint()
    resumed = Trainer(config_for(run_dir), callbacks=[point])
    resumed.run(resume="latest")
    assert point.at == ("train_epoch", 1, 4, True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))


class SaveAtRunEnd(Callback):
    def on_run_end(self, trainer: Trainer) -> None:
        self.saved = trainer.save_checkpoint()


def test_a_checkpoint_saved_at_the_end_of_the_run_is_on_disk_when_run_returns(tmp_path: pathlib.Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    disk = SlowDisk(monkeypatch, delay=0.5)
    disk.release()
    save = SaveAtRunEnd()
    Trainer(config_for(tmp_path / "run", train={"epochs": 1, "max_steps": 3}), callbacks=[save]).run()
    assert read_latest(tmp_path / "run" / "checkpoints") == save.saved
    intact(save.saved)


class SeesTheStopCheckpoint(Callback):
    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        assert isinstance(exc, RunInterrupted) and exc.checkpoint is not None
        self.on_disk = read_latest(trainer.run_folder.checkpoints) == exc.checkpoint


def test_a_signal_stop_is_reported_with_its_checkpoint_on_disk(tmp_path: pathlib.Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    disk = SlowDisk(monkeypatch, delay=0.3)
    disk.release()
    sees = SeesTheStopCheckpoint()
    with pytest.raises(RunInterrupted):
        Trainer(config_for(tmp_path / "run"), callbacks=[TermAt(step=6), sees]).run()
    assert sees.on_disk  # what the stop line names (and what a hook reads) exists when it is said


class Buffers(Callback):
    """State that shares memory: a buffer and a slice of it, both in its state dict (as a flat optimizer
    buffer and its per-parameter views are). Records what a resume loaded, at the run's start."""

    def __init__(self) -> None:
        self.buffer = torch.zeros(10)
        self.view = self.buffer[:4]

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        self.buffer.add_(0.5)

    def on_run_start(self, trainer: Trainer) -> None:
        self.loaded = (self.view.clone(), self.view.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr())

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "view": self.view}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer, self.view = state["buffer"], state["view"]


@pytest.mark.parametrize("background", [True, False])
def test_tensors_that_share_memory_share_it_after_a_resume_as_torch_save_keeps_them(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, background: bool) -> None:
    disk = SlowDisk(monkeypatch)
    if not background:
        disk.release()
    run_dir = tmp_path / "run"
    sections = {"checkpoint": {**SECTIONS["checkpoint"], "background": background}}
    with pytest.raises(Crash):  # in the background, step 4's checkpoint is written after steps 5 and 6
        Trainer(config_for(run_dir, **sections), callbacks=[Buffers(), Watch(6, disk), CrashAt(step=7)]).run()
    resumed = Buffers()
    Trainer(config_for(run_dir, **sections), callbacks=[resumed]).run(resume="latest")
    view, shares = resumed.loaded
    assert torch.equal(view, torch.full((4,), 2.0)) and shares  # step 4's values, still a view of the buffer
