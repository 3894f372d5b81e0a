"""Two real processes (torch.distributed with gloo on the CPU): sharding, metrics and predict order."""
from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
import torch
from safetensors.torch import load_file, load_model

from examples.digits import make_model
from tests import conftest
from tests.conftest import digits
from tests.test_schedulers import expected_run_lrs

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def two_processes(*args: str) -> subprocess.CompletedProcess[str]:
    return conftest.two_processes("tests.distributed_job", *args)


def test_two_processes_train_and_gather_each_sample_exactly_once(tmp_path: pathlib.Path) -> None:
    result = two_processes(str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads((tmp_path / "results.json").read_text())
    assert seen["processes"] == 2
    # 1259 train samples, 32 per process per batch: ceil(630 / 32) = 20 steps per epoch on each process.
    assert seen["steps"] == 3 * 20

    test = digits()["test"]
    inputs, targets = test.tensors
    model = make_model(hidden=64)
    load_model(model, str(tmp_path / "run" / "model.safetensors"))
    with torch.no_grad():
        expected = model.eval()(inputs)
    predictions = torch.load(tmp_path / "predictions.pt", weights_only=True)
    assert predictions.shape == expected.shape  # every sample once: no padding duplicates
    assert torch.allclose(predictions, expected, atol=1e-5)
    accuracy = (expected.argmax(1) == targets).float().mean().item()
    assert seen["evaluate"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    loss = torch.nn.functional.cross_entropy(expected, targets).item()
    assert seen["evaluate"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert len(seen["history"]["eval/accuracy"]) == 3


def test_two_process_mid_epoch_resume_is_bitwise_exact(tmp_path: pathlib.Path) -> None:
    assert two_processes(str(tmp_path / "a"), "resume-test", "-1").returncode == 0  # never crashes
    crashed = two_processes(str(tmp_path / "b"), "resume-test", "14")  # after the step-12 checkpoint
    assert crashed.returncode != 0
    # It crashed where it was told to, not earlier (a launch that failed would make the resume start afresh).
    assert (tmp_path / "b" / "run" / "checkpoints" / "epoch002-step0000012-train_epoch").is_dir(), crashed.stderr[-3000:]
    result = two_processes(str(tmp_path / "b"), "resume-test", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    # 10 steps an epoch per process; checkpoints every 4 steps: the crash at 14 resumes from step 12.
    assert f"resuming {tmp_path / 'b' / 'run'} from epoch002-step0000012-train_epoch: epoch 2, step 12" in result.stdout
    assert "no checkpoint in" not in result.stderr
    a = load_file(str(tmp_path / "a" / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "run" / "metrics.jsonl").read_text() == (tmp_path / "b" / "run" / "metrics.jsonl").read_text()


def test_a_nan_loss_on_one_process_is_decided_by_all(tmp_path: pathlib.Path) -> None:
    # Only the first process sees the NaN batch; the gradients are averaged, so both must skip that step.
    skipped = two_processes(str(tmp_path / "skip"), "nan-test", "skip")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    # Steps 1 and 20 hold index 0 (the last batch is padded with the first indices): the process that saw
    # the NaN and the other one both skip them.
    seen, told = skipped.stderr.count("non-finite loss (nan) at"), skipped.stderr.count("loss on another process")
    assert seen == told == 2, skipped.stderr[-3000:]
    weights = load_file(tmp_path / "skip" / "run" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


# All torchrun launches live in this file: with the suite on two workers (one per file), two launches at
# once made one of them lose a rank (gloo: connection closed by peer) on this 2-core machine.
def test_two_cpu_processes_refuse_freezing_and_sync_batchnorm_and_step_schedules_over_their_shared_total(
        tmp_path: pathlib.Path) -> None:
    result = conftest.two_processes("tests.features_job", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        seen = json.loads((tmp_path / f"refusals-{rank}.json").read_text())
        assert seen["freeze"].startswith("ConfigError: phase 'freeze' (Freeze) changes which parameters train"), seen
        assert "DistributedDataParallel" in seen["freeze"]
        # torch's SyncBatchNorm trains on GPUs only: on CPU processes the refusal shows the flag reached the model.
        assert "SyncBatchNorm" in seen["sync_batchnorm"] and "GPU" in seen["sync_batchnorm"], seen
        assert seen["run_dirs"] == []
    # Each process holds half the samples: ceil(630 / 32) = 20 updates, or 10 with two micro-batches each.
    for grad_accum_steps, steps in [(1, 20), (2, 10)]:
        for rank in (0, 1):
            lrs = json.loads((tmp_path / f"lrs-accum{grad_accum_steps}-rank{rank}.json").read_text())
            assert lrs == pytest.approx(expected_run_lrs(steps), rel=1e-12), (grad_accum_steps, rank)
    # phasetrain.compat: 20 batches per process, 2 per update: 10 updates an epoch, 20 in 2 epochs, on each.
    runs = [json.loads((tmp_path / f"compat-{rank}.json").read_text()) for rank in (0, 1)]
    assert runs[0] == runs[1]  # the same schedule and the same (reduced) losses on both
    assert (runs[0]["total_steps"], runs[0]["stepped"], runs[0]["updates_per_epoch"]) == (20, 20, 10)
