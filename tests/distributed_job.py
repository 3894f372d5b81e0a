"""Two-process digits runs for tests/test_distributed.py, under torchrun:

    torchrun --nproc_per_node 2 -m tests.distributed_job OUT                  every scenario, into OUT/<name>
    torchrun --nproc_per_node 2 -m tests.distributed_job OUT resume-test N    crash at step N (0: resume)

The scenarios: train, evaluate, predict (gather); the main job without dropout (batch); NaN inputs on one
process only (nan); one process asks to stop (stop, stop-on-exit); one process gets a SIGTERM (sigterm, and
sigterm-own-loop with a train_epoch of one's own);
the resume test's run, never stopped (resume); tests/features_job.py's (features).

``resume-test N`` kills process 1 (SIGKILL) at optimizer step N; ``resume-test 0`` resumes; ``resume-test
never`` runs without a crash.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import time
from typing import Any

import torch

from phasetrain import Callback, RunConfig, Trainer
from phasetrain.signals import RunInterrupted
from tests.conftest import digits, digits_config


def resume_test(out: pathlib.Path, crash_step: int | None) -> None:
    """Dropout, shuffling, accumulation and mid-epoch checkpoints across two processes; at ``crash_step`` process
    1 is killed (0: resume instead, None: run through)."""
    config = digits_config(out / "run", model={"args": {"hidden": 64, "dropout": 0.3}},
                           train={"epochs": 2, "grad_accum_steps": 2},
                           checkpoint={"every_epochs": 1, "every_steps": 4, "keep_last": 1})
    trainer = Trainer(config, callbacks=[FailOnProcess1(crash_step, "kill")] if crash_step else [])
    trainer.run(resume="latest" if crash_step == 0 else None)


class NaNOnFirstProcess(torch.utils.data.Dataset[Any]):
    """The digits train split with a NaN input at index 0, which only the first process's shard holds."""

    def __len__(self) -> int:
        return len(digits()["train"])  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        x, y = digits()["train"][index]
        return (x * float("nan") if index == 0 else x), y


def nan_test(out: pathlib.Path, mode: str) -> None:
    """A NaN loss on one process: both must skip (or stop at) the same step, or the weights go NaN."""
    config = digits_config(out / "run", train={"epochs": 1, "shuffle": False, "nonfinite_loss": mode})
    Trainer(config, train_data=NaNOnFirstProcess()).run()


class OneProcess(Callback):
    """On process 1 only: ask the run to stop at optimizer step 7 (``stop``) or from the exit hook of epoch 1's
    checkpoint phase, whose way out depends on it (``stop-on-exit``)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.accelerator.process_index == 1 and self.how == "stop" and trainer.state.optimizer_step == 7:
            trainer.request_stop("process 1's own reason")

    def on_exit_checkpoint(self, trainer: Trainer) -> None:
        if trainer.accelerator.process_index == 1 and self.how == "stop-on-exit":
            trainer.request_stop("process 1's own reason")

    def on_run_end(self, trainer: Trainer) -> None:
        state = trainer.state
        (pathlib.Path(trainer.run_folder.path).parent / f"end-{trainer.accelerator.process_index}.json").write_text(
            json.dumps({"step": state.optimizer_step, "epoch": state.epoch, "reason": state.stop_reason,
                        "at": time.time()}))


class FailOnProcess1(Callback):
    """At optimizer ``step`` process 1 raises (``raise``), is killed as a lost machine would be (``kill``) or
    receives a SIGTERM meant for it alone (``sigterm``); also for a config's ``callbacks``."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.accelerator.process_index == 1 and trainer.state.optimizer_step == self.step:
            if self.how in ("kill", "sigterm"):
                os.kill(os.getpid(), signal.SIGKILL if self.how == "kill" else signal.SIGTERM)
            else:
                raise RuntimeError("a bug on process 1 only")


def stop_test(out: pathlib.Path, how: str) -> None:
    config = digits_config(out / "run", train={"epochs": 3}, checkpoint={"every_epochs": 1})
    Trainer(config, callbacks=[OneProcess(how)]).run()


def gather_test(out: pathlib.Path) -> None:
    """Train, then evaluate and predict on the test split (269 samples: not divisible by 2)."""
    trainer = Trainer(digits_config(out / "run", train={"epochs": 3}, checkpoint={"every_epochs": 3}))
    history = trainer.run()
    results = trainer.evaluate(digits()["test"])
    predictions = trainer.predict(digits()["test"])
    if trainer.accelerator.is_main_process:
        torch.save(predictions, out / "predictions.pt")
        (out / "results.json").write_text(json.dumps({
            "processes": trainer.accelerator.num_processes, "evaluate": results,
            "history": history.state_dict(), "steps": trainer.state.optimizer_step}))


def batch_test(out: pathlib.Path) -> None:
    """The main job without dropout, 8 epochs: test_distributed.py compares it with one process at batch 64."""
    config = RunConfig.from_file(pathlib.Path(__file__).parents[1] / "examples" / "digits.yaml", overrides=[
        f"run_dir={out / 'run'}", "model.args.dropout=0", "train.epochs=8", "train.progress_bar=false"])
    Trainer(config).run()


class PlainLoopTrainer(Trainer):
    """A train_epoch of one's own (as docs/trainer.md shows), without the trainer's per-step loss check."""

    def train_epoch(self) -> None:
        self.model.train()
        for batch in self.data.train_batches(self.state.epoch, skip=self.state.batch_in_epoch):
            loss = self.calculate_train_batch_loss(batch)["loss"]
            self.backward_step(loss)
            self.optimizer_step()
            self.scheduler_step()
            self.optimizer_zero_grad()
            self.state.batch_in_epoch += 1
            self.end_optimizer_step(loss.detach())


def sigterm_test(out: pathlib.Path, trainer_class: type[Trainer] = Trainer) -> None:
    """Process 1 alone gets a SIGTERM at step 27 (as from `kill PID`): both must stop at one step, one checkpoint."""
    config = digits_config(out / "run", train={"epochs": 3})
    try:
        trainer_class(config, callbacks=[FailOnProcess1(27, "sigterm")]).run()
    except RunInterrupted as stopped:
        (out / f"stopped-{os.environ['RANK']}.json").write_text(json.dumps({"checkpoint": str(stopped.checkpoint),
                                                                            "message": str(stopped)}))


def main() -> None:
    """Without a mode, every scenario one after the other in this one launch (a launch costs ~8 s here)."""
    import torch.distributed as dist

    from tests import features_job
    torch.set_num_threads(1)
    out = pathlib.Path(sys.argv[1])
    if len(sys.argv) > 2:
        resume_test(out, None if sys.argv[3] == "never" else int(sys.argv[3]))
        return
    gather_test(out / "gather")
    batch_test(out / "batch")
    nan_test(out / "nan", "skip")
    stop_test(out / "stop", "stop")
    stop_test(out / "stop-on-exit", "stop-on-exit")
    sigterm_test(out / "sigterm")
    sigterm_test(out / "sigterm-own-loop", PlainLoopTrainer)
    resume_test(out / "resume", None)  # never stopped: what a resumed run must equal
    features_job.run_all(out / "features")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
