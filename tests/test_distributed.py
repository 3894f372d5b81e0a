"""Real processes (torch.distributed with gloo on the CPU), launched as users launch them: torchrun, accelerate
launch, ``phasetrain run --num-processes``, and two "machines" meeting at a rendezvous.

All launches of the suite live in this file: with the suite on two workers (one file each), two launches at
once made one of them lose a process (gloo: connection closed by peer) on this 2-core machine. Most checks
share one launch (tests/distributed_job.py runs every scenario in turn; a launch costs ~8 s here).
"""
from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, load_model

from examples.digits import make_model
from phasetrain import Callback, RunConfig, Trainer
from phasetrain.checkpoint_files import verify
from tests import conftest
from tests.conftest import digits, records_without_times
from tests.test_docs import MULTI_PROCESS_PAGES, project_copy
from tests.test_schedulers import expected_run_lrs

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def records(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    return records_without_times(run_dir)


def phasetrain(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phasetrain", *args], capture_output=True, text=True, cwd=ROOT,
                          env=conftest.subprocess_env(**env), timeout=300, check=False)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, subprocess.CompletedProcess[str]]:
    """Every scenario of tests/distributed_job.py, in one two-process torchrun launch (no ACCELERATE_* variable:
    phasetrain must find the launch itself); the folder they wrote into and the launch's output."""
    out = tmp_path_factory.mktemp("scenarios")
    result = conftest.two_processes("tests.distributed_job", str(out))
    assert result.returncode == 0, result.stderr[-5000:]
    return out, result


# ---- one launch, many scenarios -------------------------------------------------------------------------
def test_two_processes_train_and_gather_each_sample_exactly_once(scenarios: Any) -> None:
    out = scenarios[0] / "gather"
    seen = json.loads((out / "results.json").read_text())
    assert seen["processes"] == 2
    # 1259 train samples, 32 per process per batch: ceil(630 / 32) = 20 steps per epoch on each process.
    assert seen["steps"] == 3 * 20

    test = digits()["test"]
    assert len(test) % 2 == 1  # not divisible by the 2 processes: a padded shard would count a sample twice
    inputs, targets = test.tensors
    model = make_model(hidden=64)
    load_model(model, str(out / "run" / "model.safetensors"))
    with torch.no_grad():
        expected = model.eval()(inputs)
    predictions = torch.load(out / "predictions.pt", weights_only=True)
    assert predictions.shape == expected.shape  # every sample once: no padding duplicates
    assert torch.allclose(predictions, expected, atol=1e-5)
    accuracy = (expected.argmax(1) == targets).float().mean().item()
    assert seen["evaluate"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    loss = torch.nn.functional.cross_entropy(expected, targets).item()
    assert seen["evaluate"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert len(seen["history"]["eval/accuracy"]) == 3


def test_two_processes_match_one_process_with_twice_the_batch(scenarios: Any, tmp_path: pathlib.Path) -> None:
    # Each step of two processes with batch 32 and of one with batch 64 holds the same 64 samples (the processes
    # interleave the same order); without dropout, only the last, padded batch and the order of float sums
    # differ. Measured: losses within 0.2%, accuracies equal; allowed: 0.5% and one sample of the 269.
    two = records(scenarios[0] / "batch" / "run")
    config = RunConfig.from_file(ROOT / "examples" / "digits.yaml", overrides=[
        f"run_dir={tmp_path / 'one'}", "model.args.dropout=0", "train.epochs=8", "train.progress_bar=false",
        "train.batch_size=64"])
    Trainer(config).run()
    one = records(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    assert [r["step"] for r in two if r["phase"] == "train_epoch" and r["kind"] == "epoch"] == [20 * e for e in range(1, 9)]
    for a, b in zip(two, one, strict=True):
        for key in (k for k in a if k.startswith(("eval/", "test/"))):
            close = pytest.approx(b[key], rel=0.005) if key.endswith("loss") else pytest.approx(b[key], abs=1.01 / 269)
            assert a[key] == close, (key, a, b)


def test_a_nan_loss_on_one_process_is_decided_by_all(scenarios: Any) -> None:
    out, launch = scenarios
    # Only the first process sees the NaN batch; the gradients are averaged, so both must skip that step.
    # Steps 1 and 20 hold index 0 (the last batch is padded with the first indices): the process that saw
    # the NaN and the other one both skip them.
    seen, told = launch.stderr.count("non-finite loss (nan) at"), launch.stderr.count("loss on another process")
    assert seen == told == 2, launch.stderr[-3000:]
    weights = load_file(out / "nan" / "run" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("how", ["stop", "stop-on-exit"])
def test_a_stop_one_process_requests_stops_every_process_at_the_same_step(scenarios: Any, how: str) -> None:
    out = scenarios[0] / how
    ends = [json.loads((out / f"end-{rank}.json").read_text()) for rank in (0, 1)]
    # 20 steps an epoch: asked at step 7, or in the exit hook of epoch 1's checkpoint phase.
    # Mid-epoch the processes agree in the all-reduce the next step makes anyway: they stop one step later.
    expected = (8, 1) if how == "stop" else (20, 1)
    assert [(end["step"], end["epoch"]) for end in ends] == [expected, expected], ends
    assert ends[1]["reason"] == "process 1's own reason"
    assert ends[0]["reason"] == "process 1's own reason (on process 1)"
    assert (out / "run" / "model.safetensors").is_file()  # the run finished: final weights written


@pytest.mark.parametrize("loop", ["sigterm", "sigterm-own-loop"])
def test_a_sigterm_that_reaches_one_process_stops_both_at_the_same_step(scenarios: Any, loop: str) -> None:
    out = scenarios[0] / loop
    stopped = [json.loads((out / f"stopped-{rank}.json").read_text()) for rank in (0, 1)]
    # Process 1 got it after step 27. The trainer's loop agrees in the all-reduce of step 28's loss check and
    # writes one checkpoint there; a train_epoch of one's own, without that check, agrees at the end of step 27.
    step = 28 if loop == "sigterm" else 27
    saved = out / "run" / "checkpoints" / f"epoch002-step{step:07d}-train_epoch"
    assert [s["checkpoint"] for s in stopped] == [str(saved), str(saved)]
    assert all(s["message"].startswith("SIGTERM received") for s in stopped)
    verify(saved)
    assert json.loads((saved / "state.json").read_text())["processes"] == 2  # both wrote their part


def test_two_cpu_processes_refuse_freezing_and_sync_batchnorm_and_step_schedules_over_their_shared_total(
        scenarios: Any) -> None:
    out = scenarios[0] / "features"
    for rank in range(2):
        seen = json.loads((out / f"refusals-{rank}.json").read_text())
        assert seen["freeze"].startswith("ConfigError: phase 'freeze' (Freeze) changes which parameters train"), seen
        assert "DistributedDataParallel" in seen["freeze"]
        # torch's SyncBatchNorm trains on GPUs only: on CPU processes the refusal shows the flag reached the model.
        assert "SyncBatchNorm" in seen["sync_batchnorm"] and "GPU" in seen["sync_batchnorm"], seen
        assert seen["run_dirs"] == []
    # Each process holds half the samples: ceil(630 / 32) = 20 updates, or 10 with two micro-batches each.
    for grad_accum_steps, steps in [(1, 20), (2, 10)]:
        for rank in (0, 1):
            lrs = json.loads((out / f"lrs-accum{grad_accum_steps}-rank{rank}.json").read_text())
            assert lrs == pytest.approx(expected_run_lrs(steps), rel=1e-12), (grad_accum_steps, rank)
    # phasetrain.compat: 20 batches per process, 2 per update: 10 updates an epoch, 20 in 2 epochs, on each.
    runs = [json.loads((out / f"compat-{rank}.json").read_text()) for rank in (0, 1)]
    assert runs[0] == runs[1]  # the same schedule and the same (reduced) losses on both
    assert (runs[0]["total_steps"], runs[0]["stepped"], runs[0]["updates_per_epoch"]) == (20, 20, 10)
    # train.fast_dev_run: one throwaway folder for both processes, removed at the end; run_dir left alone.
    fast = [json.loads((out / f"fast-{rank}.json").read_text()) for rank in (0, 1)]
    assert fast[0]["run_dir"] == fast[1]["run_dir"] != str(out / "fast"), fast
    assert [f["steps"] for f in fast] == [1, 1] and not fast[0]["left"]
    assert not (out / "fast").exists()


# ---- the launchers, as docs/distributed.md shows them ---------------------------------------------------
@pytest.mark.parametrize("page", MULTI_PROCESS_PAGES)
def test_the_launchers_of_the_multi_process_page_run_the_main_job_alike(tmp_path: pathlib.Path, page: str) -> None:
    # The page's blocks, run here rather than in test_docs.py so that no two launches run at once.
    project = project_copy(tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "docs_runner.py"), str(ROOT / page)], cwd=project,
                            capture_output=True, text=True, check=False, timeout=600, env=conftest.subprocess_env())
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    # --num-processes 2, plain torchrun (no ACCELERATE_* variable) and accelerate launch: the same two processes.
    runs = [records(project / "runs" / name) for name in ("dist-two", "dist-torchrun", "dist-accelerate")]
    assert runs[0] == runs[1] == runs[2]
    # 1259 samples, 32 per process per batch: ceil(630 / 32) = 20 steps an epoch, half of one process's 40.
    assert [r["step"] for r in runs[0] if r["phase"] == "train_epoch" and r["kind"] == "epoch"] == \
        [20 * epoch for epoch in range(1, 6)]
    assert [r for r in runs[0] if r["kind"] == "epoch"][-1]["test/accuracy"] > 0.85  # 0.889 after 5 epochs; 0.974 after the main job's 15 on two processes


# ---- failures ---------------------------------------------------------------------------------------------
def test_a_two_machine_run_killed_on_one_machine_ends_in_bounded_time_and_resumes_bitwise(
        scenarios: Any, tmp_path: pathlib.Path) -> None:
    uninterrupted = scenarios[0] / "resume"  # the same run on two processes of one launch, never stopped
    # Two "machines" of one process each; at step 14 the second one's process is killed (SIGKILL).
    start = time.monotonic()
    crashed = conftest.two_nodes("tests.distributed_job", str(tmp_path / "b"), "resume-test", "14")
    took = time.monotonic() - start
    assert all(launch.returncode != 0 for launch in crashed), [launch.stderr[-2000:] for launch in crashed]
    assert took < 60, took  # the whole run, started and killed after about 5 s of training
    # It crashed where it was told to, not earlier (a launch that failed would make the resume start afresh).
    checkpoints = tmp_path / "b" / "run" / "checkpoints"
    assert (checkpoints / "epoch002-step0000012-train_epoch").is_dir(), crashed[0].stderr[-3000:]
    copy = tmp_path / "c" / "run"
    shutil.copytree(tmp_path / "b" / "run", copy)  # resumed below on one process
    resumed = conftest.two_nodes("tests.distributed_job", str(tmp_path / "b"), "resume-test", "0")
    assert all(launch.returncode == 0 for launch in resumed), resumed[0].stderr[-3000:]
    # 10 steps an epoch per process; checkpoints every 4 steps: the crash at 14 resumes from step 12.
    assert f"resuming {tmp_path / 'b' / 'run'} from epoch002-step0000012-train_epoch: epoch 2, step 12" in resumed[0].stdout
    assert "no checkpoint in" not in resumed[0].stderr
    a = load_file(str(uninterrupted / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records_without_times(uninterrupted / "run") == records_without_times(tmp_path / "b" / "run")

    # The same checkpoint resumed on one process: the rest of epoch 2 is re-sharded from the saved position.
    # Two processes had each taken 4 batches of 32: 256 of 1259 samples; the 1003 left make 32 batches, or
    # 16 steps of 2, so the run ends at step 12 + 16 = 28 (a resume that skipped 4 of its own batches would
    # end at 12 + 18 = 30).
    config = RunConfig.from_file(copy / "config.yaml", overrides=[f"run_dir={copy}"])
    steps = StepCount()
    with pytest.warns(UserWarning, match="resume is not bitwise exact: checkpoint was written by 2 process") as said:
        history = Trainer(config, callbacks=[steps]).run(resume="latest")
    assert sum("not bitwise exact" in str(w.message) for w in said) == 1
    assert steps.seen == list(range(13, 29))
    # Its train/loss covers the whole epoch: the 256 samples the two processes had summed, then the 1003.
    assert steps.epoch_samples == [1259]
    # Not bitwise (another batch size per step from there), but the same training: close to the two processes'.
    reference = [r for r in records(uninterrupted / "run") if "eval/accuracy" in r][-1]["eval/accuracy"]
    assert history.get_latest_metric("eval/accuracy") == pytest.approx(reference, abs=0.05)


class StepCount(Callback):
    def __init__(self) -> None:
        self.seen: list[int] = []
        self.epoch_samples: list[int] = []

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        self.seen.append(trainer.state.optimizer_step)

    def on_exit_train_epoch(self, trainer: Trainer) -> None:
        self.epoch_samples.append(trainer._train_loss.samples)  # what epoch 2's train/loss is the mean of


def test_an_error_on_one_process_ends_the_run_and_a_sigterm_stops_its_resume(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text((ROOT / "examples" / "digits.yaml").read_text() + (
        "\ncallbacks: [{target: tests.distributed_job:FailOnProcess1, args: {step: 27, how: raise}}]\n"))
    run_dir = tmp_path / "run"
    start = time.monotonic()
    failed = phasetrain("run", str(config), f"run_dir={run_dir}", "train.epochs=100", "checkpoint.every_epochs=1",
                        "train.progress_bar=false", "--num-processes", "2")
    assert time.monotonic() - start < 60
    # Process 1's traceback; process 0, waiting for it in a collective, says so in one line; the launcher exits
    # with the failed process's code.
    assert failed.returncode == 1 and "RuntimeError: a bug on process 1 only" in failed.stderr, failed.stderr[-3000:]
    assert "phasetrain: error: process 0 of 2: another process of the run stopped answering" in failed.stderr
    # The failure came at step 27, in epoch 2: epoch 1's checkpoint is there, intact, and nothing after it.
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["epoch001-step0000020-checkpoint"]
    verify(checkpoints / "epoch001-step0000020-checkpoint")

    # Resumed without the failing callback, then stopped by a SIGTERM to the launcher, as a scheduler would.
    resumed = subprocess.Popen([sys.executable, "-m", "phasetrain", "resume", str(run_dir), "callbacks=[]",
                                "--num-processes", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env=conftest.subprocess_env())
    deadline = time.monotonic() + 120
    while (checkpoints / "latest").read_text().strip() == "epoch001-step0000020-checkpoint":  # past its first epoch
        assert resumed.poll() is None and time.monotonic() < deadline, resumed.communicate()[1][-3000:]
        time.sleep(0.05)
    resumed.send_signal(signal.SIGTERM)
    out, err = resumed.communicate(timeout=60)
    assert out.count("from epoch001-step0000020-checkpoint: epoch 1, step 20") == 1, out
    assert resumed.returncode == 143, err[-3000:]
    said = [line for line in err.splitlines() if "SIGTERM received: saved" in line]
    assert len(said) == 1, err[-3000:]  # one line, from the main process
    assert said[0].endswith(f"resume with 'phasetrain resume {run_dir} --num-processes 2'")
    saved = pathlib.Path(said[0].split("saved ")[1].split(";")[0])
    verify(saved)
    assert json.loads((saved / "state.json").read_text())["processes"] == 2  # both wrote their part of it
    assert (checkpoints / "latest").read_text().strip() == saved.name


def test_the_launcher_names_a_process_killed_by_a_signal_and_looks_past_those_that_only_lost_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from phasetrain.launch import LOST_PROCESS_EXIT, _failed

    def failure(rank: int, exitcode: int, at: int) -> ProcessFailure:
        failed = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="")
        failed.timestamp = at
        return failed

    # Process 0 noticed first (same second, lower rank), but process 1 was the one killed.
    killed = ChildFailedError("phasetrain", {0: failure(0, LOST_PROCESS_EXIT, 5), 1: failure(1, -9, 5)})
    assert _failed(killed, 2, "runs/x") == 137
    assert capsys.readouterr().err == (
        "phasetrain: error: process 1 of 2 was killed by SIGKILL; the launcher stopped the others; the checkpoints "
        "written before are intact: continue with 'phasetrain resume runs/x' through the same launcher (2 "
        "processes)\n")
    # An error the process showed itself: its exit code, and nothing more said; the launcher's SIGTERM to the
    # other process is not a cause.
    raised = ChildFailedError("phasetrain", {0: failure(0, -15, 4), 1: failure(1, 2, 4)})
    assert _failed(raised, 2, "runs/x") == 2
    assert capsys.readouterr().err == ""
