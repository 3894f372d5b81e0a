"""Two-process checks of the training features, run by tests/distributed_job.py in its one launch.

``run_all(OUT)`` writes OUT/refusals-RANK.json (what two CPU processes refuse before any training),
OUT/lrs-accum{1,2}-rankRANK.json (the lr after every optimizer step of a warmup_cosine run),
OUT/compat-RANK.json (a phasetrain.compat run whose OneCycleLR is sized by the placeholders) and
OUT/fast-RANK.json (a train.fast_dev_run on both processes).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import torch

from phasetrain import Trainer
from tests.conftest import digits_config
from tests.test_schedulers import warmup_cosine_run


def batchnorm_model() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


def refusal(out: pathlib.Path, **build: Any) -> str | None:
    """The error building ``Trainer(digits_config(**build), model=...)`` raised, or None if it built."""
    config = digits_config(out, model=None, **build)
    try:
        Trainer(config, model=batchnorm_model())
    except Exception as exc:  # noqa: BLE001 - which one, is what the test asserts
        return f"{type(exc).__name__}: {exc}"
    return None


def run_all(out: pathlib.Path) -> None:
    """Every check, into ``out`` (tests/distributed_job.py runs it in its launch). Freeze: DDP fixes the trained
    parameters when it wraps the model. train.sync_batchnorm: torch's SyncBatchNorm trains on GPUs only,
    so on the CPU the refusal is how the flag shows it reached the model."""
    import torch.distributed as dist
    out.mkdir(parents=True, exist_ok=True)
    seen = {
        "freeze": refusal(out / "freeze", phases=[{"target": "phasetrain.finetuning:Freeze",
                                                   "args": {"patterns": ["0.*"]}, "after": "setup"}]),
        "sync_batchnorm": refusal(out / "sync", train={"epochs": 1, "sync_batchnorm": True}),
        "run_dirs": [str(path) for path in (out / "freeze", out / "sync") if path.exists()],
    }
    (out / f"refusals-{dist.get_rank()}.json").write_text(json.dumps(seen))
    for grad_accum_steps in (1, 2):
        _, recorder = warmup_cosine_run(out / f"run-accum{grad_accum_steps}", grad_accum_steps)
        (out / f"lrs-accum{grad_accum_steps}-rank{dist.get_rank()}.json").write_text(json.dumps(recorder.lrs))
    (out / f"compat-{dist.get_rank()}.json").write_text(json.dumps(compat_run()))
    fast = Trainer(digits_config(out / "fast", train={"fast_dev_run": True}, checkpoint={"every_epochs": 1}))
    fast.run()  # every process writes its part of the checkpoint into the one throwaway folder
    (out / f"fast-{dist.get_rank()}.json").write_text(json.dumps(
        {"run_dir": str(fast.run_folder.path), "steps": fast.state.optimizer_step, "left": fast.run_folder.path.exists()}))


def compat_run() -> dict[str, Any]:
    """A pytorch-accelerated style run on two processes: OneCycleLR sized by the placeholders, with
    accumulation (it refuses a step past its total, so an overcount fails the run)."""
    import functools

    from examples.digits import make_data
    from phasetrain.compat import Trainer as CompatTrainer
    from phasetrain.compat import TrainerPlaceholderValues
    data = make_data(seed=0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    schedule = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1,
                                 epochs=TrainerPlaceholderValues.NUM_EPOCHS,
                                 steps_per_epoch=TrainerPlaceholderValues.NUM_UPDATE_STEPS_PER_EPOCH)
    trainer = CompatTrainer(model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                            callbacks=())
    trainer.train(train_dataset=data["train"], eval_dataset=data["eval"], num_epochs=2, per_device_batch_size=32,
                  gradient_accumulation_steps=2, create_scheduler_fn=schedule,
                  train_dataloader_kwargs={"num_workers": 0}, eval_dataloader_kwargs={"num_workers": 0})
    return {"total_steps": trainer.scheduler.total_steps, "stepped": trainer.scheduler.last_epoch,
            "updates_per_epoch": trainer.run_config.num_update_steps_per_epoch,
            "eval_loss": trainer.run_history.get_metric_values("eval_loss_epoch")}

