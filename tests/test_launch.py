"""Launches that cannot work are refused before anything runs; a resume with another process count
re-shards the rest of the epoch. (The launches themselves, with real processes, are in test_distributed.py.)"""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from phasetrain.cli import main
from phasetrain.data import EpochBatchSampler
from tests.conftest import ROOT, subprocess_env

USER_SCRIPT = """
import os, sys
from accelerate import Accelerator
from phasetrain import Trainer
from phasetrain.errors import LaunchError
from tests.conftest import digits_config
Accelerator()  # the script's own Accelerator, made before the launch variables say there are two processes
os.environ.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
try:
    Trainer(digits_config(sys.argv[1]))
except LaunchError as exc:
    print(exc)
"""


def test_a_process_of_a_launch_that_accelerate_sees_alone_is_refused(tmp_path: pathlib.Path) -> None:
    # accelerate's process state is made once per process: a script that made it before the launch was seen
    # would leave each process training alone on the same run folder.
    result = subprocess.run([sys.executable, "-c", USER_SCRIPT, str(tmp_path / "run")], capture_output=True,
                            text=True, cwd=ROOT, env=subprocess_env(), timeout=120, check=False)
    assert result.stdout.startswith("this process was launched as one of 2 (WORLD_SIZE=2), but accelerate sees 1 "
                                    "process (DistributedType.NO)"), result.stdout + result.stderr[-2000:]
    assert "torchrun --nproc_per_node N" in result.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("count", "world_size", "says"), [
    ("0", None, "--num-processes 0: expected 1 or more processes"),
    ("3", "2", "--num-processes 3 given inside a launch of 2 processes (WORLD_SIZE=2): leave --num-processes out"),
])
def test_a_process_count_that_cannot_run_is_one_line(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch, count: str,
                                                     world_size: str | None, says: str) -> None:
    if world_size:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.chdir(ROOT)
    code = main(["run", "examples/digits.yaml", f"run_dir={tmp_path / 'run'}", "--num-processes", count])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "run").exists()


def test_a_bad_config_is_refused_once_before_any_process_starts(tmp_path: pathlib.Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code = main(["run", "examples/digits.yaml", "train.epohcs=2", f"run_dir={tmp_path}", "--num-processes", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("phasetrain: error:") == 1 and "train.epohcs" in err, err
    assert "process 0 of" not in err  # said by the command itself, not by each launched process


@pytest.mark.parametrize(("size", "batch_size", "before", "after"), [(1259, 32, 2, 1), (1259, 32, 1, 2), (1259, 7, 3, 2),
                                                                     (100, 4, 2, 3)])
def test_re_sharding_continues_the_epoch_with_every_sample_left_exactly_once(size: int, batch_size: int, before: int,
                                                                              after: int) -> None:
    def batches(world_size: int, start: int = 0) -> list[list[int]]:
        return [list(batch) for rank in range(world_size)
                for batch in EpochBatchSampler(size, batch_size, shuffle=True, drop_last=False, seed=5, epoch=2,
                                               rank=rank, world_size=world_size, start=start)]

    taken = 3  # batches each of the `before` processes finished before the checkpoint
    first = [batch for rank in range(before)
             for batch in EpochBatchSampler(size, batch_size, shuffle=True, drop_last=False, seed=5, epoch=2, rank=rank,
                                            world_size=before).batches[:taken]]
    consumed = taken * batch_size * before
    rest = batches(after, start=consumed)
    order = [i for batch in EpochBatchSampler(size, size, shuffle=True, drop_last=False, seed=5, epoch=2) for i in batch]
    seen = [i for batch in first for i in batch]
    assert sorted(seen) == sorted(order[:consumed])  # interleaved shards consume a prefix of the epoch's order
    left = [i for batch in rest for i in batch]
    padding = -(size - consumed) % after  # the last batches are padded to equal length, as any epoch's are
    assert sorted(left) == sorted(order[consumed:] + order[consumed:consumed + padding])
    assert all(len(batch) <= batch_size for batch in rest)




def test_a_schedule_sized_by_the_process_count_refuses_a_resume_with_another_count() -> None:
    from phasetrain.errors import ConfigError
    from phasetrain.resume_changes import refuse_other_process_count
    with pytest.raises(ConfigError, match=r"checkpoint c was written by 2 process\(es\) and this run has 1: the "
                                          r"scheduler's args use \{steps_per_epoch\}, \{total_steps\}, which the "
                                          r"process count changes"):
        refuse_other_process_count("c", 2, 1, {"T_max": "{total_steps}", "every": "{steps_per_epoch} * 2"})
    refuse_other_process_count("c", 2, 2, {"T_max": "{total_steps}"})  # the same count
    refuse_other_process_count("c", 2, 1, {"T_max": "{epochs}"})  # the count does not change it
    refuse_other_process_count("c", 2, 1, None)  # no scheduler


def test_a_re_sharded_epoch_groups_its_own_batches_into_steps() -> None:
    from phasetrain.batches import RunData
    from phasetrain.config import TrainConfig
    from tests.conftest import digits
    data = RunData({"train": digits()["train"]}, TrainConfig(batch_size=32, grad_accum_steps=2), seed=0)
    assert (data.accumulation.batches, data.accumulation.steps) == (40, 20)  # 1259 samples, the whole epoch
    # Three processes had taken 3 batches of 32 each: 288 samples consumed, 971 left for this one process:
    # 31 batches, 16 steps, the last of one batch (its loss is not halved).
    resharded = data.epoch_accumulation(start=data.consumed_samples(0, 3, 3))
    assert (resharded.batches, resharded.steps, resharded.group_size(30)) == (31, 16, 1)
    assert data.consumed_samples(1200, 3, 2) == 1259  # never past the epoch's end


def test_a_launch_that_shards_the_model_is_refused_before_anything_is_saved() -> None:
    from accelerate.utils import DistributedType

    from phasetrain.accelerator import refuse_sharding
    from phasetrain.errors import LaunchError
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        with pytest.raises(LaunchError, match=f"shards the model across processes \\({sharded.value}\\)"):
            refuse_sharding(sharded)
    for whole in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        refuse_sharding(whole)


def test_srun_tasks_without_a_launcher_are_refused_before_the_run_folder_is_touched(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # as `srun --ntasks 4 phasetrain run ...` sets it
    monkeypatch.chdir(ROOT)
    assert main(["run", "examples/digits.yaml", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("phasetrain: error: srun started 4 tasks of phasetrain without a launcher") and \
        err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task: a plain run
    assert main(["plan", "examples/digits.yaml"]) == 0


@pytest.mark.parametrize(("size", "start", "world_size"), [(100, 99, 3), (2, 0, 3), (1, 0, 8), (1259, 1258, 2)])
def test_fewer_samples_left_than_processes_still_give_every_process_a_batch(size: int, start: int,
                                                                          world_size: int) -> None:
    # DDP needs every process to take as many steps: with too few samples the padding repeats them, as often
    # as it takes (a resume of a nearly finished epoch on more processes than samples left).
    from phasetrain.data import shard_size
    shards = [EpochBatchSampler(size, 4, shuffle=True, drop_last=False, seed=1, epoch=1, rank=rank,
                                world_size=world_size, start=start).batches for rank in range(world_size)]
    assert [len(batches) for batches in shards] == [1] * world_size
    assert [len(batches[0]) for batches in shards] == [shard_size(size - start, r, world_size, pad=True)
                                                       for r in range(world_size)]


HOLD_THE_LOCK = """
import pathlib, sys, time
from phasetrain.run_folder import RunFolder
with RunFolder(pathlib.Path(sys.argv[1])).locked():
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_run_folder_in_use_is_refused_before_any_process_starts(tmp_path: pathlib.Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path / "run")], stdout=subprocess.PIPE,
                              text=True, env=subprocess_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        monkeypatch.chdir(ROOT)
        code = main(["run", "examples/digits.yaml", f"run_dir={tmp_path / 'run'}", "overwrite=true",
                     "--num-processes", "2"])
        err = capsys.readouterr().err
        # Said by the command itself, once; launched processes would have said it after the others timed out.
        assert code == 2 and err.count("\n") == 1 and f"is in use by process {holder.pid}" in err, err
    finally:
        holder.kill()
        holder.wait()


def test_phasetrain_warnings_are_shown_by_the_main_process_only(capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A resume's warnings (config changes, a corrupt checkpoint skipped) are the same on every process.
    from phasetrain import cli
    source = str(pathlib.Path(cli.__file__).parent / "trainer.py")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, shown in (("1", ""), ("0", "phasetrain: warning: resuming with changes\n")):
        monkeypatch.setenv("RANK", rank)
        cli._show_warning(UserWarning("resuming with\n   changes"), UserWarning, source, 1)
        assert capsys.readouterr().err == shown
