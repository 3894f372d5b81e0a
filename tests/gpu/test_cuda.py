"""The GPU checks of docs/distributed.md, run whenever a CUDA machine is at hand (skipped without one, so CI
stays CPU-only):

    CUBLAS_WORKSPACE_CONFIG=:4096:8 python -m pytest tests/gpu -q

On one GPU: fp16 (with accelerate's GradScaler) and bf16 train and resume mid-epoch bit for bit with
deterministic algorithms on; the scaler's state is in every checkpoint and comes back on resume; batches
are loaded into pinned memory and copied without blocking.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest
import torch

from phasetrain import Trainer
from tests.conftest import digits_config
from tests.test_resume import CrashAt, crash_then_resume, weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def deterministic() -> Iterator[None]:
    # cuBLAS needs this set before its first use to be deterministic (torch says so when it is not).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_resumes_bitwise_on_the_gpu(tmp_path: pathlib.Path, precision: str) -> None:
    def trainer_for(name: str, *callbacks: object) -> Trainer:
        config = digits_config(tmp_path / name, model={"args": {"hidden": 64, "dropout": 0.2}},
                               train={"epochs": 3, "mixed_precision": precision, "grad_accum_steps": 2},
                               checkpoint={"every_epochs": 1, "every_steps": 7})
        return Trainer(config, callbacks=list(callbacks))

    reference, resumed, at = crash_then_resume(trainer_for, CrashAt(step=30))
    # 40 batches an epoch, 2 per step: 20 steps; the crash at step 30 resumes from the step-28 checkpoint (epoch 2).
    assert at == ("train_epoch", 2, 28, True)
    assert reference.accelerator.device.type == "cuda"
    assert all(torch.equal(a, b) for a, b in zip(weights(reference), weights(resumed), strict=True))
    if precision == "fp16":
        scaler = resumed.accelerator.scaler
        assert scaler is not None
        assert scaler.state_dict() == reference.accelerator.scaler.state_dict()  # its scale and growth tracker too
        saved = torch.load(tmp_path / "b" / "checkpoints" / "epoch002-step0000028-train_epoch" / "state.pt",
                           weights_only=True)
        assert "scale" in saved["scaler"]
    else:
        assert resumed.accelerator.scaler is None


def test_batches_come_through_pinned_memory_without_blocking(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run"))
    batches = trainer.data.train_batches(epoch=1)
    inputs, _ = next(iter(batches))
    assert inputs.is_pinned()  # DataLoader(pin_memory=True) on a GPU run
    on_gpu = trainer.data.to_device((inputs, inputs))
    assert on_gpu[0].device.type == "cuda"
    torch.cuda.synchronize()
    assert torch.equal(on_gpu[0].cpu(), inputs)
