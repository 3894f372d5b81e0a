"""Faulty datasets and stop signals with DataLoader workers, through real digits runs.

A bad item (None, an item that raises, a ``__len__`` past the data) ends the run with one ``DataError``
naming the split, the dataset's class and the item, with or without workers. A SIGTERM to the whole
process group (what docker, Kubernetes, systemd and Slurm send) with workers saves and exits 143, as
it does without them. The faulty datasets live here so that the CLI runs import them by spec.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
import yaml
from torch.utils.data import Dataset

from examples.digits import make_data
from phasetrain import DataError, RunConfig, Trainer
from phasetrain.batches import RunData
from phasetrain.config import TrainConfig
from phasetrain.data import EpochBatchSampler
from tests.conftest import digits_config, subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
AT = 1000  # the faulty train item: every epoch reads it, at a batch that depends on the shuffle


class Faulty(Dataset[Any]):
    """A digits split with one bad item, ``at``."""

    def __init__(self, data: Dataset[Any], at: int) -> None:
        self.data, self.at = data, at

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.bad(index) if index == self.at else self.data[index]

    def bad(self, index: int) -> Any:
        raise NotImplementedError


class NoneAt(Faulty):
    def bad(self, index: int) -> Any:
        return None


class RaisesAt(Faulty):
    def bad(self, index: int) -> Any:
        raise ValueError(f"sample {index} is corrupt\n(second line of the message)")


class LongerThanData(Faulty):
    """Claims 41 items more than it has: reading past the real end raises the tensor's IndexError."""

    def __len__(self) -> int:
        return len(self.data) + 41  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.data[index]


class OddShapeAt(Faulty):
    def bad(self, index: int) -> Any:
        return torch.zeros(65), torch.tensor(0)


class FailsInWorkers(Faulty):
    """Fails in a DataLoader worker only: re-reading the item in the main process works."""

    def bad(self, index: int) -> Any:
        if torch.utils.data.get_worker_info() is not None:
            raise OSError("stale file handle")
        return self.data[index]


FAULTS = {kind.__name__: kind for kind in (NoneAt, RaisesAt, LongerThanData, OddShapeAt, FailsInWorkers)}


def faulty_digits(fault: str, split: str = "train", at: int = AT) -> dict[str, Dataset[Any]]:
    """The digits splits with ``split`` replaced by ``FAULTS[fault]`` (a ``data`` target for configs)."""
    data: dict[str, Dataset[Any]] = dict(make_data(seed=0))
    data[split] = FAULTS[fault](data[split], at)
    return data


def faulty_config(run_dir: pathlib.Path, fault: str, num_workers: int = 0, **args: Any) -> RunConfig:
    return digits_config(run_dir, data={"target": "tests.test_data_faults:faulty_digits",
                                        "args": {"fault": fault, **args}},
                         train={"epochs": 1, "num_workers": num_workers})


def run_error(config: RunConfig) -> DataError:
    with pytest.raises(DataError) as info:
        Trainer(config).run()
    assert info.value.__cause__ is not None  # the original exception stays chained for a debugger
    return info.value


# ---- bad items ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_none_item_is_named_with_its_split_class_and_index(tmp_path: pathlib.Path, num_workers: int) -> None:
    message = str(run_error(faulty_config(tmp_path / "run", "NoneAt", num_workers)))
    assert message.startswith(f"train dataset (NoneAt): item {AT} is None: ")
    assert "__getitem__ must return a sample" in message
    assert not multiprocessing.active_children()  # the workers stopped with the run, not at some later gc


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_item_that_raises_is_named_with_the_first_line_of_its_error(tmp_path: pathlib.Path,
                                                                       num_workers: int) -> None:
    error = run_error(faulty_config(tmp_path / "run", "RaisesAt", num_workers))
    message = str(error)
    assert message.startswith(f"train dataset (RaisesAt): reading item {AT} raised ValueError: "
                              f"sample {AT} is corrupt; ")
    assert type(error.__cause__) is ValueError  # the loader's own error (from a worker: same type, its traceback)
    assert "second line" not in message and "\n" not in message


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_len_larger_than_the_data_says_so(tmp_path: pathlib.Path, num_workers: int) -> None:
    message = str(run_error(faulty_config(tmp_path / "run", "LongerThanData", num_workers)))
    found = re.fullmatch(r"train dataset \(LongerThanData\): reading item (\d+) raised IndexError: .*; "
                         r"len\(\) says 1300; __len__ may be larger than the data", message)
    assert found, message
    assert int(found[1]) >= 1259  # past the real end of the 1,259 train samples


def test_a_bad_eval_item_names_the_eval_split(tmp_path: pathlib.Path) -> None:
    message = str(run_error(faulty_config(tmp_path / "run", "NoneAt", split="eval", at=100)))
    assert message.startswith("eval dataset (NoneAt): item 100 is None: ")


def test_items_that_load_but_do_not_stack_name_the_batch(tmp_path: pathlib.Path) -> None:
    message = str(run_error(faulty_config(tmp_path / "run", "OddShapeAt")))
    number, batch = batch_holding(AT)
    assert message.startswith(f"train dataset (OddShapeAt): the items of batch {number} of 40 (items "
                              f"{', '.join(map(str, batch[:4]))}, ... (32 in all)) load but do not stack into one "
                              "batch: RuntimeError: stack expects each tensor to be equal size"), message


def test_a_failure_the_main_process_cannot_reproduce_still_names_dataset_and_batch(tmp_path: pathlib.Path) -> None:
    message = str(run_error(faulty_config(tmp_path / "run", "FailsInWorkers", num_workers=2)))
    number, batch = batch_holding(AT)
    assert message.startswith(f"train dataset (FailsInWorkers): loading batch {number} of 40 (items "
                              f"{', '.join(map(str, batch[:4]))}, ... (32 in all)) failed with OSError: stale file "
                              "handle; reading its items again one by one in the main process worked"), message


@pytest.mark.parametrize("num_workers", [0, 2])
def test_after_a_mid_epoch_resume_the_failed_batch_is_still_named_by_its_place_in_the_epoch(num_workers: int) -> None:
    data = RunData(faulty_digits("FailsInWorkers" if num_workers else "OddShapeAt"),
                   TrainConfig(batch_size=32, num_workers=num_workers), seed=0)
    number, batch = batch_holding(AT)
    named = f"batch {number} of 40 (items {', '.join(map(str, batch[:4]))}, ... (32 in all))"
    for skip in (0, number - 1):  # resumed right before the failing batch: it is the first one loaded
        with pytest.raises(DataError) as info:
            for _ in data.train_batches(epoch=1, skip=skip):
                pass
        assert named in str(info.value)


def test_the_dry_run_names_a_bad_first_item_and_leaves_no_run_folder(tmp_path: pathlib.Path) -> None:
    message = str(run_error(faulty_config(tmp_path / "run", "RaisesAt", at=0)))
    assert message.startswith("train dataset (RaisesAt): reading item 0 raised ValueError: sample 0 is corrupt; ")
    assert not (tmp_path / "run").exists()


def test_cli_prints_one_line_and_exits_2_for_a_bad_item_with_workers(tmp_path: pathlib.Path) -> None:
    config_file = write_config(tmp_path, faulty_config(tmp_path / "run", "NoneAt", num_workers=2))
    result = subprocess.run([sys.executable, "-m", "phasetrain.cli", "run", str(config_file)], cwd=ROOT,
                            env=cli_env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"phasetrain: error: train dataset (NoneAt): item {AT} is None: ")


# ---- stop signals with workers --------------------------------------------------------------------------
def test_a_process_that_exits_holding_a_loader_with_workers_does_not_hang() -> None:
    """At interpreter exit, multiprocessing SIGTERMs live workers and joins them with no timeout: workers
    that ignored every SIGTERM would hang this exit forever. They must still end on their main process's."""
    script = ("from examples.digits import make_data\n"
              "from phasetrain.batches import RunData\n"
              "from phasetrain.config import TrainConfig\n"
              "data = RunData(make_data(), TrainConfig(num_workers=2), seed=0)\n"
              "held = iter(data.train_batches(epoch=1))\n"
              "next(held)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_the_step_and_exits_143(tmp_path: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    config = digits_config(run_dir, train={"epochs": 3, "num_workers": 2, "log_every_steps": 2})
    config_file = write_config(tmp_path, config)
    stderr_file = tmp_path / "run.err"
    with open(stderr_file, "w") as stderr:
        # Its own process group, as a container's or a Slurm step's: the signal reaches the workers too.
        process = subprocess.Popen([sys.executable, "-m", "phasetrain.cli", "run", str(config_file)], cwd=ROOT,
                                   env=cli_env(), stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        seen = wait_for_step_record(run_dir / "metrics.jsonl", process)
        os.killpg(process.pid, signal.SIGTERM)
        returncode = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr_text = stderr_file.read_text()
    assert returncode == 143, stderr_text
    saved = re.search(r"SIGTERM received: saved (\S+); resume with", stderr_text)
    assert saved, stderr_text
    checkpoint = pathlib.Path(saved[1])
    assert checkpoint.is_dir() and checkpoint.parent == run_dir / "checkpoints"
    step = int(re.fullmatch(r"epoch\d{3}-step(\d{7})-\w+", checkpoint.name)[1])  # type: ignore[index]
    # Saved at the step the signal found (the only checkpoint of this run): usually a later one than the
    # last record seen, that one itself if the signal landed between its record and its signal check.
    assert step >= seen
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    resumed = subprocess.run([sys.executable, "-m", "phasetrain.cli", "resume", str(run_dir)], cwd=ROOT,
                             env=cli_env(), capture_output=True, text=True, timeout=180, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from {checkpoint.name}" in resumed.stdout
    assert (run_dir / "model.safetensors").is_file()


def wait_for_step_record(metrics: pathlib.Path, process: subprocess.Popen[bytes]) -> int:
    """Poll until a step record of epoch 1 is in ``metrics``; the optimizer step of the last one seen."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before the signal"
        text = metrics.read_text() if metrics.is_file() else ""
        records = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]  # whole lines
        if any(r["kind"] == "step" and r["epoch"] == 1 for r in records):
            return max(r["step"] for r in records)
        time.sleep(0.01)
    raise AssertionError("no step record within 120 s")


def batch_holding(index: int) -> tuple[int, list[int]]:
    """(1-based number, indices) of the batch of epoch 1 that holds train item ``index`` (seed 0, batch 32)."""
    batches = EpochBatchSampler(1259, 32, shuffle=True, drop_last=False, seed=0, epoch=1).batches
    return next((n + 1, list(batch)) for n, batch in enumerate(batches) if index in batch)


def write_config(folder: pathlib.Path, config: RunConfig) -> pathlib.Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def cli_env() -> dict[str, str]:
    return subprocess_env(PYTHONUNBUFFERED="1")


class IterableWithNone(torch.utils.data.IterableDataset[Any]):
    """An iterable split whose 40th item is None: its items cannot be read again by index."""

    def __iter__(self) -> Any:
        train = make_data(seed=0)["train"]
        for index in range(len(train)):  # type: ignore[arg-type]
            yield None if index == 40 else train[index]


def test_an_iterable_dataset_that_fails_is_named_too(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 1}), train_data=IterableWithNone())
    with pytest.raises(DataError, match=r"^train dataset \(IterableWithNone\): loading a batch failed with "
                                        r"TypeError: object of type .NoneType. has no len"):
        trainer.run()
