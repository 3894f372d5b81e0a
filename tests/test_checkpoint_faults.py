"""Checkpoints that are not what was written, that belong elsewhere, or that cannot be written at all.

Every run here is the digits run cut at step 13 (checkpoints at steps 4, 8 and 12) or stopped by a full
disk; every resume asserts where it started and, where it matters, that it ends bitwise equal to the
uninterrupted run.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from examples.digits import make_model
from phasetrain import Callback, CheckpointError, Trainer
from phasetrain.checkpoint import intact
from phasetrain.errors import CorruptCheckpoint
from tests.conftest import ResumePoint, digits_config
from tests.test_resume import Crash, CrashAt, Exploit, resign, weights

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One epoch of 40 optimizer steps, a checkpoint every 4, all kept.
SECTIONS: dict[str, Any] = {"train": {"epochs": 1}, "checkpoint": {"every_steps": 4, "keep_last": 20, "every_epochs": 0}}


def config_for(run_dir: pathlib.Path, **sections: Any) -> Any:
    return digits_config(run_dir, **{**SECTIONS, **sections})


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[torch.Tensor]:
    """The final weights of the uninterrupted run."""
    trainer = Trainer(config_for(tmp_path_factory.mktemp("reference") / "run"))
    trainer.run()
    return weights(trainer)


@pytest.fixture
def crashed_run(tmp_path: pathlib.Path) -> pathlib.Path:
    """A run stopped at step 13 with checkpoints at steps 4, 8 and 12."""
    with pytest.raises(Crash):
        Trainer(config_for(tmp_path / "run"), callbacks=[CrashAt(step=13)]).run()
    return tmp_path / "run"


def checkpoint_at(run_dir: pathlib.Path, step: int) -> pathlib.Path:
    return run_dir / "checkpoints" / f"epoch001-step{step:07d}-train_epoch"


def resume(run_dir: pathlib.Path, which: str | pathlib.Path = "latest", **kwargs: Any
           ) -> tuple[Trainer, tuple[str, int, int, bool] | None]:
    """Resume the run of ``run_dir`` in a new Trainer; returns it and the (phase, epoch, step, resumed) it started at."""
    point = ResumePoint()
    trainer = Trainer(config_for(run_dir), callbacks=[point])
    trainer.run(resume=which, **kwargs)
    return trainer, point.at


def flip_a_bit(file: pathlib.Path) -> None:
    data = bytearray(file.read_bytes())
    data[-10] ^= 0x01
    file.write_bytes(bytes(data))


def write_manifest(checkpoint: pathlib.Path, manifest: Any) -> None:
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def skip_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "skipping checkpoint" in str(w.message)]


# ---- 1. the manifest must list every file ---------------------------------------------------------------

def test_a_bit_flip_is_found_even_when_the_manifest_lists_no_files(crashed_run: pathlib.Path,
                                                                   reference: list[torch.Tensor]) -> None:
    newest = checkpoint_at(crashed_run, 12)
    flip_a_bit(newest / "model.safetensors")
    write_manifest(newest, {"files": {}})
    with pytest.raises(CorruptCheckpoint, match=r"holds model.safetensors, process-0.pt, state.json, state.pt, which "
                                                r"manifest.json does not list"):
        resume(crashed_run, newest)
    with pytest.warns(UserWarning, match="skipping checkpoint: .*which manifest.json does not list"):
        resumed, at = resume(crashed_run)
    assert at == ("train_epoch", 1, 8, True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), reference, strict=True))


@pytest.mark.parametrize("manifest", [{}, [1, 2], {"files": []}, {"files": {"state.pt": {"crc32": "00000000"}}},
                                      {"files": {"state.pt": {"size": 1}}}, {"files": {"../state.pt": {"size": 1,
                                                                                                       "crc32": "0"}}}],
                         ids=["empty-object", "list", "files-a-list", "no-size", "no-crc32", "path-outside"])
def test_a_manifest_of_the_wrong_shape_is_a_corrupt_checkpoint(crashed_run: pathlib.Path, manifest: Any) -> None:
    newest = checkpoint_at(crashed_run, 12)
    write_manifest(newest, manifest)
    with pytest.raises(CorruptCheckpoint, match=r"has a malformed manifest.json: expected \{\"files\""):
        resume(crashed_run, newest)
    with pytest.warns(UserWarning, match="skipping checkpoint: .*step0000012.* has a malformed manifest.json"):
        _, at = resume(crashed_run)
    assert at == ("train_epoch", 1, 8, True)


@pytest.mark.parametrize("removed", ["model.safetensors", "process-0.pt", "state.pt"])
def test_a_file_the_loader_reads_must_be_listed(crashed_run: pathlib.Path, removed: str) -> None:
    # The file and its manifest entry both gone: the manifest matches the folder, yet the load would fail.
    newest = checkpoint_at(crashed_run, 12)
    (newest / removed).unlink()
    manifest = json.loads((newest / "manifest.json").read_text())
    del manifest["files"][removed]
    write_manifest(newest, manifest)
    with pytest.raises(CorruptCheckpoint, match=f"is missing {removed}, which its state.json says it holds"):
        intact(newest)
    with pytest.warns(UserWarning, match=f"skipping checkpoint: .*is missing {removed}"):
        _, at = resume(crashed_run)
    assert at == ("train_epoch", 1, 8, True)


# ---- 2. a file the loader refuses is corruption; a checkpoint that does not fit is not -------------------

def test_a_pickle_the_loader_refuses_falls_back_to_the_previous_checkpoint(
        crashed_run: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
        reference: list[torch.Tensor]) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    newest = checkpoint_at(crashed_run, 12)
    torch.save({"rng": Exploit()}, newest / "process-0.pt")  # the last file a load reads
    resign(newest, "process-0.pt")
    with pytest.warns(UserWarning, match=r"skipping checkpoint: cannot load .*step0000012-train_epoch/process-0.pt as "
                                         r"plain tensors and data \(UnpicklingError: Unsupported global: GLOBAL "):
        resumed, at = resume(crashed_run)
    assert at == ("train_epoch", 1, 8, True)
    assert not marker.exists()
    # Nothing of step 12 that was read before the refusal survives: the run ends as the uninterrupted one.
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), reference, strict=True))


def truncate_zip(file: pathlib.Path) -> None:
    file.write_bytes(file.read_bytes()[:-200])


def break_safetensors_header(file: pathlib.Path) -> None:
    data = bytearray(file.read_bytes())
    data[0:8] = (1 << 40).to_bytes(8, "little")  # a header length past the end of the file
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(("name", "damage", "why"), [
    ("state.pt", truncate_zip,
     r"cannot load .*state.pt as plain tensors and data \(RuntimeError: PytorchStreamReader failed reading zip archive"),
    ("model.safetensors", break_safetensors_header,
     r"cannot load .*model.safetensors as safetensors \(SafetensorError: Error while deserializing header"),
], ids=["truncated-zip", "safetensors-header"])
def test_a_file_that_does_not_decode_falls_back_and_an_explicit_one_is_refused(
        crashed_run: pathlib.Path, name: str, damage: Any, why: str) -> None:
    newest = checkpoint_at(crashed_run, 12)
    damage(newest / name)
    resign(newest, name)  # the manifest matches: only the loader can tell
    with pytest.raises(CorruptCheckpoint, match=why):
        resume(crashed_run, newest)
    with pytest.warns(UserWarning, match=f"skipping checkpoint: {why}"):
        _, at = resume(crashed_run)
    assert at == ("train_epoch", 1, 8, True)


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_without_falling_back(crashed_run: pathlib.Path) -> None:
    # A model given as an object: the config cannot show the change, the checkpoint's keys and shapes do.
    trainer = Trainer(config_for(crashed_run), model=make_model(hidden=48, dropout=0.0))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(
            CheckpointError, match=r"step0000012-train_epoch does not match the configured model Sequential"):
        warnings.simplefilter("always")
        trainer.run(resume="latest")
    assert skip_warnings(caught) == []


def test_a_checkpoint_of_another_format_version_is_refused_without_falling_back(crashed_run: pathlib.Path) -> None:
    newest = checkpoint_at(crashed_run, 12)
    saved = json.loads((newest / "state.json").read_text())
    (newest / "state.json").write_text(json.dumps({**saved, "format_version": 4}))
    resign(newest, "state.json")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(
            CheckpointError, match=r"step0000012-train_epoch has format 4 .* reads format 3"):
        warnings.simplefilter("always")
        resume(crashed_run)
    assert skip_warnings(caught) == []


# ---- 3 and 4. which checkpoint: a path of this run, a name, or another run's on purpose ------------------

def test_another_runs_checkpoint_is_refused_unless_asked_for(crashed_run: pathlib.Path, tmp_path: pathlib.Path,
                                                             reference: list[torch.Tensor]) -> None:
    other = checkpoint_at(crashed_run, 8)
    second = tmp_path / "second"
    with pytest.raises(CheckpointError, match=f"checkpoint {other} belongs to run folder {crashed_run}, not "
                                              f"{second}; to start this run from another run's checkpoint pass "
                                              r"from_other_run=True \(CLI: --from-other-run\)"):
        resume(second, other)
    assert not (second / "checkpoints").exists()
    resumed, at = resume(second, other, from_other_run=True)
    assert at == ("train_epoch", 1, 8, True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), reference, strict=True))


def test_a_path_into_this_run_is_compared_resolved(crashed_run: pathlib.Path, tmp_path: pathlib.Path) -> None:
    (tmp_path / "alias").symlink_to(crashed_run)
    roundabout = tmp_path / "alias" / "checkpoints" / ".." / "checkpoints" / checkpoint_at(crashed_run, 8).name
    _, at = resume(crashed_run, roundabout)
    assert at == ("train_epoch", 1, 8, True)


def test_a_checkpoint_can_be_named_as_latest_names_it(crashed_run: pathlib.Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint 'epoch001-step0000009-train_epoch' does not exist: expected "
                                              r"a checkpoint folder, or the name of one in .*/run/checkpoints "
                                              r"\(epoch001-step0000004-train_epoch, epoch001-step0000008-train_epoch, "):
        resume(crashed_run, "epoch001-step0000009-train_epoch")
    _, at = resume(crashed_run, "epoch001-step0000008-train_epoch")
    assert at == ("train_epoch", 1, 8, True)


# ---- 5. a checkpoint that cannot be written ----------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 4 MiB tmpfs: room for the whole run (every checkpoint kept) once a ballast file is gone."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:  # not root: the file-size-limit test below takes the same path
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        # Lazy: a file a failed write left open (its exception keeps it) must not keep the mount alive.
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


class FillDiskAfter(Callback):
    """After optimizer step ``step``, fills the disk of ``ballast`` up to the last ``room()`` bytes."""

    def __init__(self, ballast: pathlib.Path, step: int, room: Callable[[], int] = lambda: 0) -> None:
        self.ballast, self.step, self.room = ballast, step, room

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.state.optimizer_step == self.step:
            trainer.wait_for_checkpoints()  # the disk fills up for the next checkpoint, not the one being written
            fill(self.ballast, self.room())


def fill(ballast: pathlib.Path, room: int) -> None:
    """Write ``ballast`` page by page until the disk is full, then give back the last ``room`` bytes."""
    page = b"\0" * 4096
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    written = 0
    try:
        while True:
            written += os.write(fd, page)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    os.truncate(ballast, written - room)


def pages(file: pathlib.Path) -> int:
    return -(-file.stat().st_size // 4096) * 4096


#: The files of a checkpoint in the order they are written, and a piece of the line that writes each.
WRITERS = {"process-0.pt": "torch_save(process_states", "state.pt": "torch_save({name", "model.safetensors": "save_model(",
           "state.json": '"state.json").write_text'}
WRITE_ORDER = list(WRITERS)


def failed_in(error: BaseException) -> list[str]:
    """The lines of phasetrain that the write error behind ``error`` passed through."""
    return [frame.line or "" for frame in traceback.extract_tb(error.__traceback__) if "phasetrain" in frame.filename]


@pytest.mark.parametrize("failing", WRITE_ORDER)
def test_a_full_disk_while_checkpointing_names_the_intact_checkpoint_and_leaves_no_partial_folder(
        small_disk: pathlib.Path, reference: list[torch.Tensor], failing: str) -> None:
    run_dir = small_disk / "run"
    first = checkpoint_at(run_dir, 4)

    def room() -> int:  # the files before ``failing`` fit (sized as in the first checkpoint), then half of it
        before = WRITE_ORDER[:WRITE_ORDER.index(failing)]
        return sum(pages(first / name) for name in before) + pages(first / failing) // 8192 * 4096

    with pytest.raises(CheckpointError) as raised:
        Trainer(config_for(run_dir), callbacks=[FillDiskAfter(small_disk / "ballast", step=5, room=room)]).run()
    assert str(raised.value) == (f"no space left on device writing {checkpoint_at(run_dir, 8)}; "
                                 f"{first.name} is intact (free space and resume)")
    assert raised.value.__cause__ and any(WRITERS[failing] in line for line in failed_in(raised.value.__cause__))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [first.name, "latest"]  # no .tmp- left
    intact(first)
    (small_disk / "ballast").unlink()
    resumed, at = resume(run_dir)
    assert at == ("train_epoch", 1, 4, True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), reference, strict=True))


def test_a_full_disk_at_the_first_checkpoint_says_none_was_written(small_disk: pathlib.Path) -> None:
    run_dir = small_disk / "run"
    with pytest.raises(CheckpointError) as raised:
        Trainer(config_for(run_dir), callbacks=[FillDiskAfter(small_disk / "ballast", step=1)]).run()
    assert str(raised.value) == (f"no space left on device writing {checkpoint_at(run_dir, 4)}; "
                                 "no checkpoint was written before (free space and resume)")
    assert list((run_dir / "checkpoints").iterdir()) == []


LIMITED_RUN = """
import json, pathlib, resource, signal, sys
from phasetrain import Callback, CheckpointError, Trainer
from tests.test_checkpoint_faults import checkpoint_at, config_for

run_dir = pathlib.Path(sys.argv[1])

class LimitFileSizeAfter(Callback):  # after the first checkpoint: its process file fits, its state.pt not
    def on_train_step_end(self, trainer, loss):
        if trainer.state.optimizer_step == 5:
            trainer.wait_for_checkpoints()  # the limit is for the next checkpoint, not the one being written
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            limit = (checkpoint_at(run_dir, 4) / "process-0.pt").stat().st_size + 1024
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

try:
    Trainer(config_for(run_dir), callbacks=[LimitFileSizeAfter()]).run()
except CheckpointError as exc:
    print(json.dumps(str(exc)))
"""


def test_a_file_size_limit_while_checkpointing_gets_the_same_one_line_error(tmp_path: pathlib.Path,
                                                                           reference: list[torch.Tensor]) -> None:
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", LIMITED_RUN, str(run_dir)], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    first = checkpoint_at(run_dir, 4)
    assert json.loads(result.stdout.splitlines()[-1]) == (f"file too large writing {checkpoint_at(run_dir, 8)}; "
                                                          f"{first.name} is intact (fix that and resume)")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [first.name, "latest"]
    intact(first)
    resumed, at = resume(run_dir)
    assert at == ("train_epoch", 1, 4, True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), reference, strict=True))
