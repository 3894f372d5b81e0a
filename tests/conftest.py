"""Shared helpers: digits configs in a temporary run folder, and callbacks that record what happened."""
from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import torch

from examples.digits import make_data
from phasetrain import Callback, RunConfig

# Tiny models on a shared 2-core machine: a second intra-op thread costs more than it brings, and the
# doc pages and subprocesses of the suite run beside these tests.
torch.set_num_threads(1)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a phasetrain subprocess: this checkout's sources first (so a scratch copy, as
    tools/mutants.py makes, is what runs), then the project folder (examples, tests)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), **extra}


def two_processes(module: str, *args: str, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` on two CPU processes under torchrun (gloo), with no other setting: phasetrain
    must find the launch itself. ``--standalone`` takes a free port: with the suite on two workers, two
    launches may run at once and would race for torchrun's default port."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", module, *args], check=False, capture_output=True, text=True, cwd=cwd,
                          env=subprocess_env(OMP_NUM_THREADS="1"), timeout=300)


def two_nodes(module: str, *args: str) -> list[subprocess.CompletedProcess[str]]:
    """``python -m MODULE ARGS`` as two "machines" of one process each: two torchrun launches
    (``--nnodes 2 --node_rank 0/1``) meeting at a c10d rendezvous on 127.0.0.1, as on a cluster."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
         "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"test-{port}",
         "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=subprocess_env(OMP_NUM_THREADS="1")) for node in (0, 1)]
    outputs = [launch.communicate(timeout=300) for launch in launches]
    return [subprocess.CompletedProcess(launch.args, launch.returncode, out, err)
            for launch, (out, err) in zip(launches, outputs, strict=True)]


#: Where pytorch-accelerated is installed for the comparison tests (README: pip install --target .reference ...).
#: Not in the environment itself: its wheel installs top-level packages named `examples` and `test`.
REFERENCE = ROOT / ".reference"


def pytorch_accelerated() -> Any:
    """pytorch-accelerated itself, from ``.reference/`` (appended to sys.path, so it shadows nothing), with
    its submodules loaded; skips the test, naming the command, when it is not installed."""
    import importlib
    import sys
    if str(REFERENCE) not in sys.path and REFERENCE.is_dir():
        sys.path.append(str(REFERENCE))
    try:
        for submodule in ("callbacks", "schedulers", "trainer"):
            importlib.import_module(f"pytorch_accelerated.{submodule}")
        return importlib.import_module("pytorch_accelerated")
    except ImportError:
        pytest.skip("pytorch-accelerated is not installed: pip install --no-deps --target .reference "
                    "pytorch-accelerated==0.1.61")


@functools.cache
def digits() -> dict[str, torch.utils.data.Dataset]:
    return make_data(seed=0)


def digits_config(run_dir: pathlib.Path, **sections: Any) -> RunConfig:
    """The examples/digits.yaml run, shortened, in ``run_dir``; ``sections`` are merged over it."""
    base: dict[str, Any] = {
        "run_dir": str(run_dir), "seed": 0,
        "model": {"target": "examples.digits:make_model", "args": {"hidden": 64}},
        "data": {"target": "examples.digits:make_data"},
        "loss": "torch.nn:CrossEntropyLoss",
        "optimizer": {"target": "torch.optim:AdamW", "args": {"lr": 0.003}},
        "metrics": {"accuracy": {"target": "torchmetrics.classification:MulticlassAccuracy",
                                 "args": {"num_classes": 10, "average": "micro"}}},
        "train": {"epochs": 2, "batch_size": 32, "progress_bar": False},
        "checkpoint": {"every_epochs": 0},
    }
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return RunConfig.from_dict(base)


@pytest.fixture
def config(tmp_path: pathlib.Path) -> RunConfig:
    return digits_config(tmp_path / "run")


class PhaseRecorder(Callback):
    """Records every phase the machine enters, with the epoch at that moment."""

    def __init__(self) -> None:
        self.visited: list[str] = []

    def _enter(self, phase: str) -> None:
        self.visited.append(phase)

    def on_enter_setup(self, trainer: Any) -> None:
        self._enter("setup")

    def on_enter_train_epoch(self, trainer: Any) -> None:
        self._enter(f"train_epoch:{trainer.state.epoch}")

    def on_enter_eval_epoch(self, trainer: Any) -> None:
        self._enter(f"eval_epoch:{trainer.state.epoch}")

    def on_enter_checkpoint(self, trainer: Any) -> None:
        self._enter(f"checkpoint:{trainer.state.epoch}")

    def on_enter_done(self, trainer: Any) -> None:
        self._enter("done")


class ResumePoint(Callback):
    """Where a run stood when ``run()`` started walking: what a resume restored (or a fresh start)."""

    def __init__(self) -> None:
        self.at: tuple[str, int, int, bool] | None = None

    def on_run_start(self, trainer: Any) -> None:
        state = trainer.state
        self.at = (state.phase, state.epoch, state.optimizer_step, state.resumed)



def records_without_times(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    """``RUN_DIR/metrics.jsonl`` without each record's ``"time"``: what a resumed run reproduces exactly, as
    times differ on every run. Phase records stay: a resume must log each phase visit once."""
    import json
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if key != "time"} for line in lines]
