"""phasetrain.compat.schedulers: pytorch-accelerated's CosineLrScheduler, bit for bit."""
from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from phasetrain.compat.schedulers import CosineLrScheduler
from tests.conftest import pytorch_accelerated
from tests.test_schedulers import lrs_per_step, optimizer

# ---- pytorch-accelerated's CosineLrScheduler ----------------------------------------------------------
COSINE_SETTINGS: list[dict[str, Any]] = [
    {"total_num_epochs": 5, "num_update_steps_per_epoch": 4},
    {"total_num_epochs": 6, "num_update_steps_per_epoch": 3, "num_warmup_epochs": 1, "lr_min": 0.0},
    {"total_num_epochs": 8, "num_update_steps_per_epoch": 3, "num_warmup_epochs": 2, "num_cooldown_epochs": 1,
     "k_decay": 2.0, "min_lr_ratio": 0.1, "warmup_starting_lr_ratio": 0.05},
    {"total_num_epochs": 4, "num_update_steps_per_epoch": 5, "num_warmup_epochs": 1, "k_decay": 0.5,
     "warmup_starting_lr": 1e-4},
]


@pytest.mark.parametrize("settings", COSINE_SETTINGS)
def test_cosine_lr_scheduler_sets_the_lrs_pytorch_accelerated_sets(settings: dict[str, Any]) -> None:
    pa = pytorch_accelerated().schedulers
    steps = settings["total_num_epochs"] * settings["num_update_steps_per_epoch"] + 3  # and past the end
    theirs_opt, ours_opt = optimizer(0.1, 0.03), optimizer(0.1, 0.03)
    theirs = pa.CosineLrScheduler(theirs_opt, **settings)
    ours = CosineLrScheduler(ours_opt, **settings)
    assert lrs_per_step(ours_opt, ours, steps) == lrs_per_step(theirs_opt, theirs, steps)  # bit for bit
    assert ours.state_dict() == theirs.state_dict()
    assert [g["initial_lr"] for g in ours_opt.param_groups] == [g["initial_lr"] for g in theirs_opt.param_groups]


def test_cosine_lr_scheduler_resumes_from_a_saved_state_dict() -> None:
    settings = COSINE_SETTINGS[2]
    opt = optimizer(0.1)
    whole = lrs_per_step(opt, CosineLrScheduler(opt, **settings), 24)
    opt = optimizer(0.1)
    first = CosineLrScheduler(opt, **settings)
    lrs_per_step(opt, first, 10)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    resumed = CosineLrScheduler(opt, **{**settings, "total_num_epochs": 1})  # the loaded state wins
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert lrs_per_step(opt, resumed, 14)[1:] == whole[11:]


def test_cosine_create_scheduler_fn_leaves_the_run_length_to_the_trainer() -> None:
    pa = pytorch_accelerated().schedulers
    ours = CosineLrScheduler.create_scheduler_fn(num_warmup_epochs=2, k_decay=1.5)
    theirs = pa.CosineLrScheduler.create_scheduler_fn(num_warmup_epochs=2, k_decay=1.5)
    assert ours.func is CosineLrScheduler and not ours.args
    named = {key: getattr(value, "name", value) for key, value in ours.keywords.items()}
    assert named == {key: getattr(value, "name", value) for key, value in theirs.keywords.items()}
    assert named["total_num_epochs"] == "NUM_EPOCHS"
    assert named["num_update_steps_per_epoch"] == "NUM_UPDATE_STEPS_PER_EPOCH"
    given = CosineLrScheduler.create_scheduler_fn(total_num_epochs=4, num_update_steps_per_epoch=5)
    assert isinstance(given(optimizer(0.1)), CosineLrScheduler)
