"""Faults real jobs meet, each reproduced for real: a damaged metrics file, two processes on one folder,
NaN inputs, a config edited between a stop and its resume, unwritable folders, signals on the command line."""
from __future__ import annotations

import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from examples.digits import make_model
from phasetrain import Callback, ConfigError, NonFiniteLossError, RunConfig, RunInterrupted, Trainer
from phasetrain.cli import main
from phasetrain.run_folder import RunFolder
from tests.conftest import digits, digits_config, subprocess_env
from tests.test_resume import Crash, CrashAt

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPOCHS3 = {"train": {"epochs": 3, "log_every_steps": 10}, "checkpoint": {"every_epochs": 1, "keep_last": 3}}


def records(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    """metrics.jsonl, parsed strictly: a bare NaN or Infinity (not JSON) fails the test."""
    def refuse(name: str) -> None:
        raise AssertionError(f"metrics.jsonl holds {name}, which is not JSON")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # Without their times, which differ on every run (tests.conftest.records_without_times).
    return [{k: v for k, v in json.loads(line, parse_constant=refuse).items() if k != "time"} for line in lines]


def cli(*args: str, cwd: pathlib.Path = ROOT, env: dict[str, str] | None = None,
        **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phasetrain", *args], cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=120, env=subprocess_env(**(env or {})), **kwargs)


def cli_here(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line in this process (from the project folder): no interpreter and torch import to pay for,
    where a test needs no process of its own."""
    out, err, folder = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(ROOT)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(folder)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The run failed with exit 2 and one ``phasetrain: error:`` line holding each needle, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("phasetrain: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def interrupted_run(run_dir: pathlib.Path, crash: Callback | None = None, **sections: Any) -> RunConfig:
    """A digits run in ``run_dir`` that crashed as epoch 3 started (checkpoints after epochs 1 and 2)."""
    config = digits_config(run_dir, **{**EPOCHS3, **sections})
    with pytest.raises(Crash):
        Trainer(config, callbacks=[crash or CrashAt(epoch_start=3)]).run()
    return config


# ---- metrics.jsonl: equal to the uninterrupted run's, whatever happened to it ----------------------------

def _delete(path: pathlib.Path) -> None:
    path.unlink()


def _cut_mid_line(path: pathlib.Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _empty(path: pathlib.Path) -> None:
    path.write_text("")


@pytest.mark.parametrize("damage", [_delete, _cut_mid_line, _empty], ids=["deleted", "cut-mid-line", "emptied"])
def test_metrics_file_is_rebuilt_from_the_checkpoint(tmp_path: pathlib.Path, damage: Any) -> None:
    Trainer(digits_config(tmp_path / "a", **EPOCHS3)).run()
    config = interrupted_run(tmp_path / "b")
    damage(tmp_path / "b" / "metrics.jsonl")
    with pytest.warns(UserWarning, match="metrics.jsonl was .* rebuilt from the checkpoint"):
        Trainer(config).run(resume="latest")
    assert records(tmp_path / "b") == records(tmp_path / "a")


def test_a_kill_during_the_metrics_rewrite_loses_nothing(tmp_path: pathlib.Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    Trainer(digits_config(tmp_path / "a", **EPOCHS3)).run()
    config = interrupted_run(tmp_path / "b", crash=CrashAt(step=100))  # records of steps 90, 100 after the checkpoint
    before = (tmp_path / "b" / "metrics.jsonl").read_text()
    replace = os.replace

    def die_before_renaming_metrics(src: str, dst: str) -> None:
        if str(dst).endswith("metrics.jsonl"):
            raise Crash  # the moment a non-atomic rewrite would have left the file empty
        replace(src, dst)

    monkeypatch.setattr("phasetrain.run_folder.os.replace", die_before_renaming_metrics)
    with pytest.raises(Crash):
        Trainer(config).run(resume="latest")
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == before
    monkeypatch.undo()
    Trainer(config).run(resume="latest")
    assert records(tmp_path / "b") == records(tmp_path / "a")


# ---- one process per run folder --------------------------------------------------------------------------

# Holds the lock, with a forked child (as a DataLoader worker is) that inherits the lock's descriptor.
HOLD_LOCK = ("import os, pathlib, sys, time\nfrom phasetrain.run_folder import RunFolder\n"
             "lock = RunFolder(pathlib.Path(sys.argv[1])).locked()\nlock.__enter__()\n"
             "child = os.fork()\nif child == 0:\n    time.sleep(60)\n    os._exit(0)\n"
             "print('locked', child, flush=True)\ntime.sleep(300)")


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path: pathlib.Path) -> None:
    interrupted_run(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")], stdout=subprocess.PIPE,
                              text=True, env=subprocess_env())
    try:
        assert holder.stdout is not None
        ready, child = holder.stdout.readline().split()
        assert ready == "locked"
        one_error_line(cli("resume", str(tmp_path / "run")), f"in use by process {holder.pid}")
        one_error_line(cli("run", "examples/digits.yaml", f"run_dir={tmp_path / 'run'}", "overwrite=true"),
                       f"in use by process {holder.pid}")
        holder.kill()  # SIGKILL: no cleanup runs; the kernel drops the lock, though the child lives on
        holder.wait()
        finished = cli_here("resume", str(tmp_path / "run"))
        assert finished.returncode == 0, finished.stderr
        assert (tmp_path / "run" / "model.safetensors").exists()
    finally:
        holder.kill()
        os.kill(int(child), signal.SIGKILL)


@pytest.mark.slow
def test_two_runs_racing_for_one_folder(tmp_path: pathlib.Path) -> None:
    args = ["examples/digits.yaml", f"run_dir={tmp_path / 'run'}", "train.epochs=1", "train.progress_bar=false"]
    env = subprocess_env()
    both = [subprocess.Popen([sys.executable, "-m", "phasetrain", "run", *args], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in both]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert re.search(r"in use by process \d+|already holds", loser), loser
    epochs = [r for r in records(tmp_path / "run") if r["kind"] == "epoch" and r["phase"] == "train_epoch"]
    assert len(epochs) == 1  # one run's records, not two interleaved


# ---- a non-finite loss -----------------------------------------------------------------------------------

class Poisoned(torch.utils.data.Dataset[Any]):
    """The digits train split with NaN inputs at ``bad`` indices, once ``poisoned`` is set."""

    def __init__(self, bad: set[int], poisoned: bool = True) -> None:
        self.data, self.bad, self.poisoned = digits()["train"], bad, poisoned

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        x, y = self.data[index]
        return (torch.full_like(x, float("nan")) if self.poisoned and index in self.bad else x), y


class PoisonAfterEpoch(Callback):
    def __init__(self, dataset: Poisoned, epoch: int) -> None:
        self.dataset, self.epoch = dataset, epoch

    def on_exit_checkpoint(self, trainer: Trainer) -> None:
        self.dataset.poisoned = trainer.state.epoch >= self.epoch


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: pathlib.Path) -> None:
    data = Poisoned({7}, poisoned=False)
    trainer = Trainer(digits_config(tmp_path / "run", **EPOCHS3), train_data=data, callbacks=[PoisonAfterEpoch(data, 1)])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 2, optimizer step \d+ \(batch \d+ "
                                                 r"of the epoch.*epoch001-step0000040-checkpoint, is intact"):
        trainer.run()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["epoch001-step0000040-checkpoint"]
    weights = load_file(tmp_path / "run" / "checkpoints" / checkpoints[0] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    live = trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.isfinite(p).all() for p in live.parameters())  # stopped before the NaN reached the weights
    assert not (tmp_path / "run" / "model.safetensors").exists()
    records(tmp_path / "run")


def test_nonfinite_loss_skip_trains_on_without_the_bad_steps(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 2, "nonfinite_loss": "skip"})
    with pytest.warns(UserWarning, match="non-finite loss") as caught:
        history = Trainer(config, train_data=Poisoned({3, 700})).run()
    assert len([w for w in caught if "optimizer step skipped" in str(w.message)]) == 4  # 2 batches x 2 epochs
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "run" / "model.safetensors").values())
    assert history.get_latest_metric("eval/accuracy") > 0.8
    assert all(r["train/loss"] is not None for r in records(tmp_path / "run") if "train/loss" in r)


def test_nonfinite_eval_metrics_stay_strict_json(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 1}), eval_data=Poisoned({0}))
    trainer.run()
    evals = [r for r in records(tmp_path / "run") if "eval/loss" in r]
    assert evals and evals[0]["eval/loss"] is None  # NaN, written as JSON's null


# ---- a config changed between a stop and its resume -------------------------------------------------------

def test_a_changed_lr_is_applied_and_named(tmp_path: pathlib.Path) -> None:
    config = interrupted_run(tmp_path / "run")
    changed = config.with_overrides(["optimizer.args.lr=0.001", "train.epochs=4"])
    trainer = Trainer(changed)
    with pytest.warns(UserWarning, match=r"resuming with config changes, applied from here on: optimizer.args.lr "
                                         r"0.003 -> 0.001, train.epochs 3 -> 4; the result may no longer be bitwise"):
        trainer.run(resume="latest")
    lrs = {r["epoch"]: r["train/lr"] for r in records(tmp_path / "run") if r["kind"] == "epoch" and "train/lr" in r}
    assert lrs == {1: 0.003, 2: 0.003, 3: 0.001, 4: 0.001}
    assert "lr: 0.001" in (tmp_path / "run" / "config.yaml").read_text()


def test_an_lr_change_under_a_scheduler_is_refused(tmp_path: pathlib.Path) -> None:
    scheduled = {"scheduler": {"target": "torch.optim.lr_scheduler:StepLR", "args": {"step_size": 40}}}
    config = interrupted_run(tmp_path / "run", **scheduled)
    with pytest.raises(ConfigError, match=r"optimizer.args.lr changed since checkpoint epoch002-step0000080-checkpoint, "
                                          r"but the scheduler torch.optim.lr_scheduler:StepLR sets it"):
        Trainer(config.with_overrides(["optimizer.args.lr=0.001"])).run(resume="latest")
    trainer = Trainer(config.with_overrides(["optimizer.args.weight_decay=0.1"]))  # not the lr: applied
    with pytest.warns(UserWarning, match=r"optimizer.args.weight_decay \(not set\) -> 0.1"):
        trainer.run(resume="latest")
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.1


def test_resume_overrides_on_the_command_line(tmp_path: pathlib.Path) -> None:
    interrupted_run(tmp_path / "run")
    refused = cli_here("resume", str(tmp_path / "run"), "model.args.hidden=32")
    one_error_line(refused, "model.args.hidden 64 -> 32", "a resumed run cannot change")
    one_error_line(cli("resume", str(tmp_path / "run"), "run_dir=elsewhere"), "a resume continues the run in its own folder")
    applied = cli_here("resume", str(tmp_path / "run"), "train.epochs=4", "train.progress_bar=false")
    assert applied.returncode == 0, applied.stderr
    warnings = [line for line in applied.stderr.splitlines() if "warning" in line.lower()]
    assert warnings == [("phasetrain: warning: resuming with config changes, applied from here on: train.epochs 3 -> "
                         "4; the result may no longer be bitwise the uninterrupted run's")]
    assert max(r["epoch"] for r in records(tmp_path / "run")) == 4


# ---- folders that cannot be written, leftovers of kills --------------------------------------------------

def test_run_dir_that_is_a_file_or_read_only(tmp_path: pathlib.Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    one_error_line(cli("run", "examples/digits.yaml", f"run_dir={tmp_path / 'file'}"), "is a file")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)],
                             capture_output=True, check=False).returncode == 0
    if not mounted:
        read_only.chmod(0o555)  # effective when not root
    try:
        one_error_line(cli("run", "examples/digits.yaml", f"run_dir={read_only / 'run'}"), "not writable")
    finally:
        if mounted:
            subprocess.run(["umount", str(read_only)], check=True)


def test_a_full_disk_outside_checkpoints_is_one_line(tmp_path: pathlib.Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)], capture_output=True,
                      check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (not root); the checkpoint case is covered by RLIMIT_FSIZE")
    try:  # no checkpoints: the step records in metrics.jsonl fill the disk
        result = cli_here("run", "examples/digits.yaml", f"run_dir={disk / 'run'}", "train.log_every_steps=1",
                     "checkpoint.every_epochs=0", "train.progress_bar=false")
        one_error_line(result, f"No space left on device writing {disk / 'run'}/", "what was saved before is intact",
                       f"'phasetrain resume {disk / 'run'}'")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_leftovers_of_kills_are_removed_and_outputs_follow_the_umask(tmp_path: pathlib.Path) -> None:
    config = interrupted_run(tmp_path / "run")
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    leftovers = [run / ".config.yaml.x1.tmp", run / ".model.safetensors.x2.tmp", checkpoints / ".latest.x3.tmp"]
    for path in leftovers:
        path.write_text("left by a kill")
    (checkpoints / ".tmp-epoch003-step0000100-checkpoint").mkdir()
    old_umask = os.umask(0o022)
    try:
        Trainer(config).run(resume="latest")
    finally:
        os.umask(old_umask)
    assert not [p for p in [*leftovers, checkpoints / ".tmp-epoch003-step0000100-checkpoint"] if p.exists()]
    outputs = [path for path in run.rglob("*") if path.is_file()]
    assert {run / "config.yaml", run / "model.safetensors", checkpoints / "latest"} < set(outputs)
    assert {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in outputs if p.stat().st_mode & 0o777 != 0o644} == {}


# ---- the command line --------------------------------------------------------------------------------------

def test_ctrl_c_prints_on_its_own_line_and_exits_130(tmp_path: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "phasetrain", "run", "examples/digits.yaml", f"run_dir={run_dir}",
                             "train.log_every_steps=2"], cwd=ROOT, stderr=subprocess.PIPE,  # bytes: \r kept
                            stdout=subprocess.PIPE, env=subprocess_env())
    deadline = time.monotonic() + 60
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130, stderr
    # The progress bar is cleared first (tqdm's \r...\r), so the line does not start inside the bar.
    assert re.search(r"\r\s*\rphasetrain: SIGINT received: saved .*; resume with 'phasetrain resume ", stderr), stderr


def wait_until_catching_sigterm(proc: subprocess.Popen[str]) -> None:
    """Until the process catches SIGTERM (Python does not by default; phasetrain's ``caught_early`` does):
    on a loaded machine the interpreter can take longer to start than any fixed sleep."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = pathlib.Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.01)
    raise AssertionError("the process never installed its SIGTERM handler")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_run_starts_stops_it_after_setup(tmp_path: pathlib.Path, signum: int, code: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "phasetrain", "run", "examples/digits.yaml",
                             f"run_dir={tmp_path / 'run'}", "train.epochs=1"], cwd=ROOT, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=subprocess_env())
    wait_until_catching_sigterm(proc)  # phasetrain's early handler is in; torch is still importing
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    name = signal.Signals(signum).name
    assert stderr.strip().splitlines() == [(f"phasetrain: {name} received: saved {tmp_path}/run/checkpoints/"
                                            f"epoch000-step0000000-setup; resume with 'phasetrain resume {tmp_path}/run'")]
    assert cli_here("resume", str(tmp_path / "run"), "train.progress_bar=false").returncode == 0


def test_a_second_ctrl_c_while_the_run_starts_stops_at_once(tmp_path: pathlib.Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "phasetrain", "run", "examples/digits.yaml",
                             f"run_dir={tmp_path / 'run'}"], cwd=ROOT, text=True, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=subprocess_env())
    wait_until_catching_sigterm(proc)  # both signals while torch imports (that takes over a second)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.splitlines() == [("phasetrain: interrupted (SIGINT) before a checkpoint could be written; whatever "
                                    "was saved before is intact")]


def test_a_run_from_python_objects_says_how_to_resume_it(tmp_path: pathlib.Path) -> None:
    class Stop(Callback):
        def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
            if trainer.state.optimizer_step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    config = RunConfig(run_dir=tmp_path / "run", loss="torch.nn:CrossEntropyLoss", optimizer="torch.optim:SGD",
                       train={"epochs": 1, "progress_bar": False})
    trainer = Trainer(config, model=make_model(), train_data=digits()["train"], callbacks=[Stop()])
    with pytest.raises(RunInterrupted, match=r"resume it from Python with the same objects: .*run\(resume='latest'\)"):
        trainer.run()
    one_error_line(cli("resume", str(tmp_path / "run")), "was trained from Python objects", "run(resume='latest')")
    # A config that names everything, with one object in place of its entry: the config alone would train
    # on other data, so the command line refuses it too.
    subset = torch.utils.data.Subset(digits()["train"], range(320))
    trainer = Trainer(digits_config(tmp_path / "objects", train={"epochs": 2, "progress_bar": False}),
                      train_data=subset, callbacks=[Stop()])
    with pytest.raises(RunInterrupted, match=r"resume it from Python with the same objects"):
        trainer.run()
    one_error_line(cli_here("resume", str(tmp_path / "objects")), "made with train_data given as Python objects",
                   "Trainer(config, train_data=...).run(resume='latest')")
    Trainer(digits_config(tmp_path / "objects", train={"epochs": 2}), train_data=subset).run(resume="latest")


def test_command_line_basics(tmp_path: pathlib.Path) -> None:
    version = cli("--version")
    assert version.returncode == 0 and re.fullmatch(r"phasetrain \d+\.\d+\.\S+\n", version.stdout)
    usage = cli("run")
    assert usage.returncode == 2 and "required: config\n" in usage.stderr  # the overrides are optional
    # The folder is checked before anything is built: a model target with a side effect never runs.
    (tmp_path / "noisy.py").write_text("import pathlib\ndef make():\n    pathlib.Path('BUILT').write_text('x')\n")
    occupied = tmp_path / "run"
    occupied.mkdir()
    (occupied / "config.yaml").write_text("seed: 0\n")
    refused = cli("run", str(ROOT / "examples/digits.yaml"), f"run_dir={occupied}", "model=noisy:make",
                  cwd=tmp_path)
    one_error_line(refused, "already holds an unfinished run")
    assert not (tmp_path / "BUILT").exists()


def test_resume_accepts_a_checkpoint_name(tmp_path: pathlib.Path) -> None:
    interrupted_run(tmp_path / "run")
    result = cli_here("resume", str(tmp_path / "run"), "--checkpoint", "epoch001-step0000040-checkpoint")
    assert result.returncode == 0, result.stderr
    assert "from epoch001-step0000040-checkpoint: epoch 1, step 40, in checkpoint" in result.stdout + result.stderr


def test_held_lock_is_reentrant_within_a_process(tmp_path: pathlib.Path) -> None:
    folder = RunFolder(tmp_path / "run")
    with folder.locked(), RunFolder(tmp_path / "run").locked():
        pass
    with folder.locked():  # released, so it can be taken again
        assert (tmp_path / "run" / ".lock").read_text().split()[0] == str(os.getpid())


def test_a_damaged_state_file_does_not_stop_drawing_the_run(tmp_path: pathlib.Path) -> None:
    interrupted_run(tmp_path / "run")
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    (tmp_path / "run" / "checkpoints" / latest / "state.json").write_text("{not json")
    drawn = cli("graph", str(tmp_path / "run"))
    assert drawn.returncode == 0 and "train_epoch" in drawn.stdout, drawn.stderr


@pytest.mark.parametrize("pointer", [b"\xff\xfe garbage", b"../../a/checkpoints/epoch001-step0000040-checkpoint\n"],
                         ids=["garbage", "path-out-of-the-run"])
def test_a_latest_pointer_that_names_no_checkpoint_here_falls_back(tmp_path: pathlib.Path, pointer: bytes) -> None:
    interrupted_run(tmp_path / "a")
    config = interrupted_run(tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "latest").write_bytes(pointer)
    trainer = Trainer(config)
    with pytest.warns(UserWarning, match="resuming from epoch002-step0000080-checkpoint, the newest intact checkpoint"):
        trainer.run(resume="latest")
    assert cli("graph", str(tmp_path / "b")).returncode == 0


BAD_COMMAND_LINES = {
    "yaml-override": (["run", "examples/digits.yaml", "train.epochs=[1"], "value is not valid YAML: line 1, column 3"),
    "python-as-config": (["run", "examples/digits.py"], "examples/digits.py: not valid YAML: line 1"),
    "folder-as-config": (["run", "examples"], "config file 'examples' is a folder"),
    "override-twice": (["run", "examples/digits.yaml", "train.epochs=3", "train.epochs=4"], "given twice"),
    "name-too-long": (["run", "examples/digits.yaml", f"run_dir={'x' * 300}"], "File name too long"),
}


@pytest.mark.parametrize("args", BAD_COMMAND_LINES.values(), ids=BAD_COMMAND_LINES.keys())
def test_bad_command_lines_get_one_line(args: tuple[list[str], str]) -> None:
    one_error_line(cli(*args[0]), args[1])


def test_a_config_file_that_is_not_text_gets_one_line(tmp_path: pathlib.Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    one_error_line(cli("run", str(tmp_path / "bin.yaml")), "not a text file (byte 0 is not UTF-8)")
    (tmp_path / "tab.yaml").write_text("a:\n\t- b\n")
    one_error_line(cli("run", str(tmp_path / "tab.yaml")), "not valid YAML: line 2, column 1: found character")


def test_a_nan_monitor_value_is_never_the_best(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 2},
                           checkpoint={"every_epochs": 1, "keep_last": 1, "keep_best": 1, "monitor": "eval/loss"})
    Trainer(config, eval_data=Poisoned({0})).run()  # eval/loss is NaN in every epoch
    states = list((tmp_path / "run" / "checkpoints").glob("*/state.json"))
    assert states
    assert all("NaN" not in state.read_text() and json.loads(state.read_text())["monitor"] is None for state in states)
