"""Using a run after training: load_model and load_run on real digits runs."""
from __future__ import annotations

import json
import pathlib
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torchmetrics.classification import MulticlassAccuracy

from examples.digits import make_data, make_model
from phasetrain import ConfigError, RunDirError, Trainer, load_model, load_run
from phasetrain.errors import CheckpointError, CorruptCheckpoint
from phasetrain.runs import evaluate_run, predict_run
from tests.conftest import ROOT, ResumePoint, digits_config, subprocess_env
from tests.test_resume import Crash, CrashAt, resign

# Three epochs, a checkpoint after each, all kept; "best" by the *highest* eval loss: epoch 1's, not the last.
SECTIONS = {"train": {"epochs": 3},
            "checkpoint": {"every_epochs": 1, "keep_last": 5, "keep_best": 1, "monitor": "eval/loss", "mode": "max"}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    Trainer(digits_config(run_dir, **SECTIONS)).run()
    return run_dir


def test_the_loaded_model_reproduces_the_runs_own_test_accuracy_exactly(finished: pathlib.Path) -> None:
    model = load_model(finished)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    inputs, targets = make_data(seed=0)["test"].tensors
    accuracy = MulticlassAccuracy(num_classes=10, average="micro")
    with torch.no_grad():
        accuracy.update(model(inputs), targets)
    assert float(accuracy.compute()) == load_run(finished).history.get_latest_metric("test/accuracy")


def test_best_and_final_are_the_weights_of_their_own_checkpoints(finished: pathlib.Path) -> None:
    run = load_run(finished)
    assert run.finished and [c.name for c in run.checkpoints] == [
        "epoch001-step0000040-checkpoint", "epoch002-step0000080-checkpoint", "epoch003-step0000120-checkpoint"]
    best, final = load_model(finished, weights="best"), load_model(finished, weights="final")
    epoch_1 = load_file(str(run.checkpoints[0] / "model.safetensors"))
    assert all(torch.equal(best.state_dict()[name], value) for name, value in epoch_1.items())
    assert not all(torch.equal(a, b) for a, b in zip(best.parameters(), final.parameters(), strict=True))
    named = load_model(finished, weights=run.checkpoints[0].name)
    assert all(torch.equal(a, b) for a, b in zip(named.parameters(), best.parameters(), strict=True))
    latest = load_model(finished, weights="latest")
    final_file = load_file(str(finished / "model.safetensors"))
    assert all(torch.equal(latest.state_dict()[name], value) for name, value in final_file.items())


def test_load_run_gives_the_history_the_trainer_returned(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 2}))
    history = trainer.run()
    run = load_run(tmp_path / "run")
    assert run.history.get_metric_names() == history.get_metric_names()
    for name in history.get_metric_names():
        assert run.history.get_metric_values(name) == history.get_metric_values(name)
    assert run.config.train.epochs == 2 and run.path == tmp_path / "run"


def test_a_model_given_as_an_object_is_loaded_into_the_one_passed(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 1})
    net = make_model(hidden=64)
    Trainer(config.model_copy(update={"model": None}), model=net).run()
    with pytest.raises(RunDirError, match="trained with a model given as a Python object.*load_model\\(run_dir, model="):
        load_model(tmp_path / "run")
    loaded = load_model(tmp_path / "run", model=make_model(hidden=64))
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), net.parameters(), strict=True))


def test_missing_weights_and_bad_names_are_one_line_each(tmp_path: pathlib.Path) -> None:
    with pytest.raises(RunDirError, match="is not a run folder: it has no config.yaml"):
        load_model(tmp_path / "nothing")
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        Trainer(digits_config(run_dir, train={"epochs": 2}, checkpoint={"every_epochs": 1, "keep_best": 0}),
                callbacks=[CrashAt(step=50)]).run()
    with pytest.raises(RunDirError, match="is not finished, so it has no final weights.*weights='latest'"):
        load_model(run_dir)
    with pytest.raises(RunDirError, match="has no best weights \\(best.safetensors\\): checkpoint.keep_best is 0"):
        load_model(run_dir, weights="best")
    with pytest.raises(RunDirError, match="has no EMA weights"):
        load_model(run_dir, weights="ema")
    with pytest.raises(RunDirError, match="weights='bset': expected one of final, best, latest, ema, or a checkpoint's "
                                          "name or folder \\(run .* has: epoch001-step0000040-checkpoint\\)"):
        load_model(run_dir, weights="bset")
    assert load_model(run_dir, weights="latest") is not None
    checkpoint = load_run(run_dir).latest_checkpoint
    assert checkpoint is not None
    data = bytearray((checkpoint / "model.safetensors").read_bytes())
    data[-10] ^= 0x01
    (checkpoint / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="model.safetensors does not match its checksum"):
        load_model(run_dir, weights="latest")


def test_weights_that_do_not_fit_the_model_name_the_keys(tmp_path: pathlib.Path) -> None:
    Trainer(digits_config(tmp_path / "run", train={"epochs": 1})).run()
    with pytest.raises(CheckpointError, match="does not match the configured model Sequential: .*shape mismatches"):
        load_model(tmp_path / "run", model=make_model(hidden=32))


def phasetrain(*args: str, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["phasetrain", *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          check=False, timeout=300)


@pytest.mark.parametrize("processes", [1, 2])
def test_evaluate_from_the_shell_gives_the_runs_own_test_metrics(finished: pathlib.Path, processes: int) -> None:
    before = sorted(p.relative_to(finished) for p in finished.rglob("*"))
    done = phasetrain("evaluate", str(finished), "--json", "--num-processes", str(processes))
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1  # printed once, by the main process
    results = json.loads(done.stdout)
    history = load_run(finished).history
    assert sorted(results) == ["test/accuracy", "test/loss"]
    assert results["test/accuracy"] == history.get_latest_metric("test/accuracy")  # every sample counted once
    if processes == 1:  # the same batches, in the same order, as the run's own test evaluation
        assert results["test/loss"] == history.get_latest_metric("test/loss")
    else:  # other batches (each process takes every other sample): float32 batch means round otherwise
        assert results["test/loss"] == pytest.approx(history.get_latest_metric("test/loss"), rel=1e-6)
    assert sorted(p.relative_to(finished) for p in finished.rglob("*")) == before  # nothing written there


@pytest.mark.parametrize("processes", [1, 2])
def test_predict_from_the_shell_writes_the_outputs_in_dataset_order(finished: pathlib.Path, tmp_path: pathlib.Path,
                                                                    processes: int) -> None:
    done = phasetrain("predict", str(finished), "--weights", "best", "-o", str(tmp_path / "p.pt"),
                      "--num-processes", str(processes))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {tmp_path / 'p.pt'}: the outputs for 269 test samples\n"  # the main process says it
    written = torch.load(tmp_path / "p.pt", weights_only=True)
    inputs, _ = make_data(seed=0)["test"].tensors
    with torch.no_grad():
        expected = load_model(finished, weights="best")(inputs)
    assert written.shape == expected.shape and torch.allclose(written, expected, atol=1e-6)


def test_predict_writes_numpy_and_csv(finished: pathlib.Path, tmp_path: pathlib.Path) -> None:
    assert phasetrain("predict", str(finished), "--split", "eval", "-o", str(tmp_path / "p.npy")).returncode == 0
    assert phasetrain("predict", str(finished), "--split", "eval", "-o", str(tmp_path / "p.csv")).returncode == 0
    array = np.load(tmp_path / "p.npy")
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert array.shape == (len(make_data(seed=0)["eval"]), 10) and len(rows) == array.shape[0] + 1
    assert rows[0] == "index," + ",".join(f"output_{i}" for i in range(10))
    assert [float(v) for v in rows[1].split(",")[1:]] == array[0].tolist()
    inputs, _ = make_data(seed=0)["eval"].tensors  # the split asked for, not the default test split
    with torch.no_grad():
        assert np.allclose(array, load_model(finished)(inputs).numpy(), atol=1e-6)


NOT_FINISHED = ("phasetrain: error: run {unfinished} is not finished, so it has no final weights (model.safetensors); "
                "use weights='latest' (its latest checkpoint) or weights='best'")


@pytest.mark.parametrize(("arguments", "expected"), [
    (["evaluate", "no/such/run"], "phasetrain: error: no/such/run is not a run folder: it has no config.yaml"),
    (["evaluate", "{unfinished}"], NOT_FINISHED),
    (["predict", "{finished}", "-o", "out.txt"], "phasetrain: error: -o out.txt: the file name must end in .pt, .npy, .csv"),
    (["evaluate", "{finished}", "--batch-size", "0"], "phasetrain: error: --batch-size 0: expected a number of samples >= 1"),
    (["predict", "{finished}", "--split", "valid"], "phasetrain: error: --split valid: expected one of test, eval, train"),
])
def test_bad_input_to_evaluate_and_predict_is_one_line_and_exit_2(finished: pathlib.Path, tmp_path: pathlib.Path,
                                                                   arguments: list[str], expected: str) -> None:
    unfinished = tmp_path / "unfinished"
    (unfinished).mkdir()
    (unfinished / "config.yaml").write_text((finished / "config.yaml").read_text())
    names = {"finished": str(finished), "unfinished": str(unfinished)}
    done = phasetrain(*[a.format(**names) for a in arguments])
    assert (done.returncode, done.stderr.strip()) == (2, expected.format(**names))





COMPILED = {"train": {"epochs": 2, "compile": True}, "checkpoint": {"every_steps": 20, "every_epochs": 0, "keep_last": 9}}


def test_a_compiled_run_trains_alike_and_its_weights_load_into_an_uncompiled_model(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "compiled", **COMPILED))
    assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)  # torch.compile's own wrapper
    compiled_history = trainer.run()
    eager_history = Trainer(digits_config(tmp_path / "eager", train={"epochs": 2})).run()
    compiled = compiled_history.get_latest_metric("test/accuracy")
    assert abs(compiled - eager_history.get_latest_metric("test/accuracy")) < 0.05  # inductor rounds otherwise
    saved = load_file(str(tmp_path / "compiled" / "checkpoints" / "epoch002-step0000080-train_epoch" / "model.safetensors"))
    assert sorted(saved) == sorted(make_model(hidden=64).state_dict())  # no _orig_mod. prefixes
    model = load_model(tmp_path / "compiled")  # eager, from the config
    inputs, targets = make_data(seed=0)["test"].tensors
    with torch.no_grad():
        accuracy = float((model(inputs).argmax(1) == targets).float().mean())
    assert abs(accuracy - compiled) < 0.01


def test_a_compiled_run_resumes_exactly(tmp_path: pathlib.Path) -> None:
    Trainer(digits_config(tmp_path / "whole", **COMPILED)).run()
    torch._dynamo.reset()  # each run compiles afresh, as a new process would
    with pytest.raises(Crash):
        Trainer(digits_config(tmp_path / "cut", **COMPILED), callbacks=[CrashAt(step=30)]).run()
    with pytest.raises(ConfigError, match="train.compile"):  # inductor rounds otherwise: not changed on resume
        Trainer(digits_config(tmp_path / "cut", train={"epochs": 2})).run(resume="latest")
    torch._dynamo.reset()
    point = ResumePoint()
    Trainer(digits_config(tmp_path / "cut", **COMPILED), callbacks=[point]).run(resume="latest")
    assert point.at == ("train_epoch", 1, 20, True)  # mid-epoch
    for a, b in zip(load_model(tmp_path / "whole").parameters(), load_model(tmp_path / "cut").parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_from_before_compile_existed_still_resumes(tmp_path: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        Trainer(digits_config(run_dir, checkpoint={"every_steps": 20}), callbacks=[CrashAt(step=30)]).run()
    checkpoint = run_dir / "checkpoints" / "epoch001-step0000020-train_epoch"
    state = json.loads((checkpoint / "state.json").read_text())
    del state["config"]["train"]["compile"], state["config"]["train"]["compile_mode"]  # as written before them
    (checkpoint / "state.json").write_text(json.dumps(state))
    resign(checkpoint, "state.json")
    point = ResumePoint()
    Trainer(digits_config(run_dir, checkpoint={"every_steps": 20}), callbacks=[point]).run(resume="latest")
    assert point.at == ("train_epoch", 1, 20, True)


def test_evaluate_and_predict_take_every_batch_of_the_split_whatever_the_run_limited(tmp_path: pathlib.Path) -> None:
    Trainer(digits_config(tmp_path / "run", train={"epochs": 1, "limit_batches": 3})).run()
    run = load_run(tmp_path / "run")
    assert predict_run(run).shape == (269, 10)
    inputs, targets = make_data(seed=0)["test"].tensors
    with torch.no_grad():
        accuracy = float((load_model(tmp_path / "run")(inputs).argmax(1) == targets).float().mean())
    assert evaluate_run(run)["test/accuracy"] == pytest.approx(accuracy, abs=1e-6)
