"""Real processes killed at random moments (SIGKILL, SIGTERM, a crash inside a checkpoint write) and resumed:
the result must be the uninterrupted run's, bit for bit, and every resume must really start from a checkpoint."""
from __future__ import annotations

import pathlib
import random
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from phasetrain.checkpoint_files import verify
from tests.conftest import records_without_times, subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

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
RESUMED = re.compile(r"resuming \S+ from (epoch(\d{3})-step(\d{7})-\w+): epoch (\d+), step (\d+), in (\w+)")


class Job:
    """``phasetrain run JOB`` / ``phasetrain resume`` in a new process, output kept in files."""

    def __init__(self, run_dir: pathlib.Path, resume: bool = False, crash_in_save: int | None = None) -> None:
        env = subprocess_env(PYTHONUNBUFFERED="1")
        if crash_in_save:
            env["PHASETRAIN_TEST_CRASH_IN_SAVE"] = str(crash_in_save)
        config_file = run_dir.parent / "job.yaml"
        config_file.write_text(yaml.safe_dump(JOB))
        args = ["resume", str(run_dir)] if resume else ["run", str(config_file), f"run_dir={run_dir}"]
        self.out, self.err = (run_dir.parent / f"job-{time.monotonic_ns()}.{s}" for s in ("out", "err"))
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "tests.resume_job", *args], cwd=ROOT, env=env,
                                            stdout=out, stderr=err, text=True)

    def finish(self) -> int:
        self.process.wait(timeout=300)
        assert self.process.returncode in (0, -signal.SIGKILL, 143), self.err.read_text()
        return self.process.returncode

    def resumed_from(self) -> tuple[int, int]:
        """(epoch, optimizer step) the resumed process started from; fails if it did not load a checkpoint."""
        assert "no checkpoint in" not in self.err.read_text()
        found = RESUMED.search(self.out.read_text())
        assert found, self.out.read_text() + self.err.read_text()
        assert (int(found[2]), int(found[3])) == (int(found[4]), int(found[5]))  # the name and the state agree
        return int(found[4]), int(found[5])


def wait_for_checkpoints(run_dir: pathlib.Path, count: int, job: Job) -> str:
    """Block until the run has written ``count`` more checkpoints (the ``latest`` pointer changed); its name."""
    pointer = run_dir / "checkpoints" / "latest"
    seen = pointer.read_text() if pointer.exists() else None
    changes = 0
    while changes < count:
        assert job.process.poll() is None, "the run ended before the kill"
        current = pointer.read_text() if pointer.exists() else None
        if current != seen:
            seen, changes = current, changes + 1
        time.sleep(0.005)
    return str(seen).strip()


def step_of(name: str) -> tuple[int, int]:
    epoch, step = name.split("-")[:2]
    return int(epoch.removeprefix("epoch")), int(step.removeprefix("step"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert Job(run_dir).finish() == 0
    return run_dir


def final_state(run_dir: pathlib.Path) -> tuple[dict[str, torch.Tensor], Any]:
    last = max((run_dir / "checkpoints").glob("epoch006-*-checkpoint"))
    return load_file(str(run_dir / "model.safetensors")), torch.load(last / "state.pt", weights_only=True)["optimizer"]


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
    assert records_without_times(run_dir) == records_without_times(reference)


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(tmp_path: pathlib.Path,
                                                                    uninterrupted: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    rng = random.Random(0)
    job = Job(run_dir)
    for _ in range(3):
        at_least = step_of(wait_for_checkpoints(run_dir, rng.randint(1, 6), job))
        time.sleep(rng.uniform(0, 0.05))  # land anywhere: mid-step, mid-eval, mid-checkpoint-write
        job.process.kill()
        job.finish()
        job = Job(run_dir, resume=True)
        # The resume starts from the checkpoint seen before the kill or a newer one, never from scratch.
        assert _wait_for_resume_line(job) >= at_least
    assert job.finish() == 0
    assert_bitwise_equal(run_dir, uninterrupted)


def _wait_for_resume_line(job: Job) -> tuple[int, int]:
    deadline = time.monotonic() + 120
    while not RESUMED.search(job.out.read_text()):
        assert job.process.poll() is None, job.err.read_text()
        assert time.monotonic() < deadline, "the resumed run printed no resume line"
        time.sleep(0.01)
    return job.resumed_from()


def test_sigterm_finishes_the_step_checkpoints_and_exits_with_a_resume_hint(tmp_path: pathlib.Path,
                                                                             uninterrupted: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    job = Job(run_dir)
    wait_for_checkpoints(run_dir, 3, job)
    job.process.send_signal(signal.SIGTERM)
    assert job.finish() == 143 and f"resume with 'phasetrain resume {run_dir}'" in job.err.read_text()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    verify(run_dir / "checkpoints" / latest)
    resumed = Job(run_dir, resume=True)
    assert resumed.finish() == 0
    assert resumed.resumed_from() == step_of(latest)
    assert_bitwise_equal(run_dir, uninterrupted)


def test_a_crash_inside_the_checkpoint_write_leaves_the_previous_one_loadable(tmp_path: pathlib.Path,
                                                                              uninterrupted: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    assert Job(run_dir, crash_in_save=4).finish() == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    half_written = [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
    assert len(half_written) == 1
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    verify(latest)  # the third checkpoint (steps 5, 10, then epoch 1's end at 14), untouched by the crash
    assert latest.name == "epoch001-step0000014-checkpoint"
    resumed = Job(run_dir, resume=True)
    assert resumed.finish() == 0
    assert resumed.resumed_from() == (1, 14)
    assert not any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())
    assert_bitwise_equal(run_dir, uninterrupted)
