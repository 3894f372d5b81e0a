"""The trainer core: overridable epochs and steps, replaceable phases, and the one owner of each batch fact."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import torch

from phasetrain import Callback, CallbackError, ConfigError, GraphError, Phase, RunConfig, Trainer
from phasetrain.batches import Accumulation, RunData
from phasetrain.config import TrainConfig
from phasetrain.data import BatchIndexed, EpochBatchSampler, WorkerSeeded
from tests.conftest import PhaseRecorder, digits, digits_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


class CountingTrainEpoch(Phase):
    """A replacement train_epoch node: counts its visits, then runs the trainer's epoch."""

    name = "train_epoch"

    def __init__(self) -> None:
        self.visits = 0

    def run(self, trainer: Trainer) -> None:
        self.visits += 1
        trainer.train_epoch()


def test_a_built_in_phase_can_be_replaced_by_name_and_the_epochs_still_count(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 3}))
    replacement = CountingTrainEpoch()
    trainer.replace_phase(replacement)
    recorder = PhaseRecorder()
    trainer.add_callback(recorder)
    trainer.run()
    assert replacement.visits == 3
    assert recorder.visited == ["setup", "train_epoch:1", "eval_epoch:1", "train_epoch:2", "eval_epoch:2",
                                "train_epoch:3", "eval_epoch:3", "done"]
    assert trainer.state.optimizer_step == 3 * 40


class SkipEval(Phase):
    name = "eval_epoch"

    def run(self, trainer: Trainer) -> None:
        trainer.log({"eval/skipped": 1.0})


def test_a_config_phase_can_replace_a_built_in_one(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 2}, checkpoint={"every_epochs": 0, "keep_best": 0},
                           phases=[{"target": "tests.test_core:SkipEval", "replace": "eval_epoch"}])
    history = Trainer(config).run()
    assert history.get_metric_values("eval/skipped") == [1.0, 1.0]
    assert "eval/loss" not in history.get_metric_names()


def test_bad_replacements_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="replace='eval_epoch' keeps the replaced phase's edges; remove after"):
        digits_config(tmp_path / "run", phases=[{"target": "tests.test_core:SkipEval", "replace": "eval_epoch",
                                                 "after": "train_epoch"}])
    config = digits_config(tmp_path / "run", phases=[{"target": "tests.test_core:SkipEval", "replace": "checkpoint"}])
    with pytest.raises(ConfigError, match="replace='checkpoint', but tests.test_core:SkipEval built a phase named "
                                          "'eval_epoch'"):
        Trainer(config)
    trainer = Trainer(digits_config(tmp_path / "run"))
    trainer.run()
    with pytest.raises(GraphError, match="changed after run\\(\\) started"):
        trainer.replace_phase(SkipEval())


class EpochLog(Trainer):
    """Overrides the epoch-level points a pytorch-accelerated user overrides."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.events: list[str] = []

    def training_run_start(self) -> None:
        self.events.append("run_start")

    def train_epoch_start(self) -> None:
        self.events.append(f"train_start {self.state.epoch} training={self.model.training}")

    def train_epoch_end(self) -> None:
        self.events.append(f"train_end {self.state.epoch} loss={'train/loss' in self.run_history.get_metric_names()}")

    def eval_epoch_start(self) -> None:
        self.events.append(f"eval_start {self.state.epoch}")

    def eval_epoch_end(self) -> None:
        self.events.append(f"eval_end {self.state.epoch}")

    def training_run_end(self) -> None:
        self.events.append("run_end")


def test_epoch_start_and_end_points_run_in_order(tmp_path: pathlib.Path) -> None:
    trainer = EpochLog(digits_config(tmp_path / "run", train={"epochs": 2}))
    trainer.run()
    assert trainer.events == ["run_start",
                              "train_start 1 training=True", "train_end 1 loss=True", "eval_start 1", "eval_end 1",
                              "train_start 2 training=True", "train_end 2 loss=True", "eval_start 2", "eval_end 2",
                              "run_end"]


class TwoPassTrainer(Trainer):
    """A whole train epoch of its own: every batch twice, through the public building blocks."""

    def train_epoch(self) -> None:
        self.model.train()
        for batch in self.data.train_batches(self.state.epoch):
            for _ in range(2):
                loss = self.calculate_train_batch_loss(batch)["loss"]
                self.backward_step(loss)
                self.optimizer_step()
                self.optimizer_zero_grad()
                self.end_optimizer_step(loss.detach())


def test_an_overridden_train_epoch_keeps_hooks_step_logs_and_mid_epoch_checkpoints(tmp_path: pathlib.Path) -> None:
    steps: list[int] = []
    losses: list[float] = []

    class Steps(Callback):
        def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
            steps.append(trainer.state.optimizer_step)
            losses.append(loss.item())

    config = digits_config(tmp_path / "run", train={"epochs": 1, "log_every_steps": 20},
                           checkpoint={"every_steps": 30, "keep_last": 5})
    TwoPassTrainer(config, callbacks=[Steps()]).run()
    assert steps == list(range(1, 81))
    records = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step_records = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in step_records] == [20, 40, 60, 80]
    for record in step_records:  # each step record: the mean of the losses the loop handed over since the last
        since = losses[record["step"] - 20: record["step"]]
        assert record["train/loss"] == pytest.approx(sum(since) / len(since), rel=1e-5)
        # Its time: the steps are counted; the samples are not known (the loop handed over losses only).
        assert record["time"]["steps_per_s"] > 0 and "samples_per_s" not in record["time"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("epoch")) == [
        "epoch001-step0000030-train_epoch", "epoch001-step0000060-train_epoch"]


def test_overriding_a_bookkeeping_method_is_refused_with_what_to_do_instead() -> None:
    with pytest.raises(TypeError, match="Quiet overrides Trainer.log, which does the run's bookkeeping and is not an "
                                        "override point: add a callback with on_log"):
        class Quiet(Trainer):
            def log(self, metrics: object, kind: str = "epoch") -> None:
                pass
    with pytest.raises(TypeError, match="overrides Trainer.end_optimizer_step"):
        class NoBookkeeping(Trainer):
            def end_optimizer_step(self, loss: torch.Tensor) -> None:
                pass


def test_code_written_for_the_old_hook_and_step_signatures_is_refused_before_it_runs(config: RunConfig) -> None:
    with pytest.raises(TypeError, match=r"^Interval.scheduler_step takes an argument, but since phasetrain 0.3 it is "
                                        r"called with none, after every optimizer step"):
        class Interval(Trainer):
            def scheduler_step(self, interval: str) -> None:
                pass

    class OldEvalHook(Callback):
        def on_eval_step_end(self, trainer: Trainer, batch_output: dict) -> None:
            pass

    with pytest.raises(CallbackError, match=r"^OldEvalHook.on_eval_step_end takes 1 argument after trainer, but the "
                                            r"hook is called with \(trainer, batch, batch_output\) since phasetrain 0.3"):
        Trainer(config, callbacks=[OldEvalHook()])


# ---- batches: one owner ------------------------------------------------------------------------------

def test_accumulation_groups_are_full_except_a_short_last_one() -> None:
    groups = Accumulation(batches=10, per_step=4)
    assert groups.steps == 3
    assert [groups.group_size(i) for i in range(10)] == [4, 4, 4, 4, 4, 4, 4, 4, 2, 2]
    assert Accumulation(batches=8, per_step=4).steps == 2
    assert Accumulation(batches=None, per_step=3).steps is None
    assert Accumulation(batches=None, per_step=3).group_size(7) == 3


def test_run_data_counts_batches_as_the_sampler_makes_them() -> None:
    data = digits()
    for world_size in (1, 2, 3):
        for drop_last in (False, True):
            cfg = TrainConfig(batch_size=32, drop_last=drop_last, grad_accum_steps=3)
            for rank in range(world_size):
                run_data = RunData(data, cfg, seed=0, process_index=rank, num_processes=world_size)
                made = list(run_data.train_batches(epoch=1))
                assert run_data.batches_per_epoch == len(made)
                assert run_data.steps_per_epoch == -(-len(made) // 3)
                assert run_data.eval_batch_count(data["eval"]) == len(list(run_data.eval_batches(data["eval"])))


def test_eval_shards_cover_every_sample_once_and_train_shards_are_padded_to_equal_length() -> None:
    data = digits()
    size = len(data["eval"])  # 269: not a multiple of 2 or 3
    for world_size in (2, 3):
        eval_indices = [i for rank in range(world_size) for batch in
                        EpochBatchSampler(size, 32, shuffle=False, drop_last=False, seed=0, epoch=0, rank=rank,
                                          world_size=world_size, pad=False) for i in batch]
        assert sorted(eval_indices) == list(range(size))
        train = [[i for batch in EpochBatchSampler(size, 32, shuffle=True, drop_last=False, seed=0, epoch=1, rank=rank,
                                                   world_size=world_size, pad=True) for i in batch]
                 for rank in range(world_size)]
        assert len({len(shard) for shard in train}) == 1
        assert set().union(*train) == set(range(size))


def test_the_data_order_depends_on_the_seed_and_the_epoch_only() -> None:
    def order(seed: int, epoch: int) -> list[list[int]]:
        torch.manual_seed(epoch * 100 + seed)  # the global RNG must not matter
        return [list(b) for b in EpochBatchSampler(1259, 32, shuffle=True, drop_last=False, seed=seed, epoch=epoch)]

    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4)
    assert order(0, 3) != order(1, 3)


# ---- plan builds no model ------------------------------------------------------------------------------

def test_plan_builds_no_model_optimizer_or_accelerator_and_reads_a_run_folder(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", model={"target": "tests.test_core:no_model_please"},
                           train={"epochs": 2}, checkpoint={"every_epochs": 1})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config.to_yaml())
    script = ("import sys; from phasetrain.plan import plan_source; import pathlib; "
              f"print(plan_source(pathlib.Path({str(config_file)!r}), [])); "
              "print('accelerate imported:', 'accelerate' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert "epoch 2 (steps 41-80): train_epoch -> eval_epoch [eval_due] -> checkpoint [checkpoint_due] -> done" \
        in result.stdout
    assert "accelerate imported: False" in result.stdout  # so no Accelerator either

    Trainer(digits_config(tmp_path / "run", train={"epochs": 2}, checkpoint={"every_epochs": 1})).run()
    result = subprocess.run([sys.executable, "-m", "phasetrain.cli", "plan", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"{tmp_path / 'run'}: finished"


def no_model_please() -> torch.nn.Module:
    raise AssertionError("plan built the model")


def test_plan_of_an_unfinished_run_folder_says_where_it_stopped(tmp_path: pathlib.Path) -> None:
    class Crash(Callback):
        def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
            if trainer.state.optimizer_step == 50:
                raise RuntimeError("crash")

    config = digits_config(tmp_path / "run", train={"epochs": 2}, checkpoint={"every_epochs": 1, "every_steps": 45})
    with pytest.raises(RuntimeError):
        Trainer(config, callbacks=[Crash()]).run()
    from phasetrain.plan import plan_source
    assert plan_source(tmp_path / "run", []).splitlines()[-1] == (
        f"{tmp_path / 'run'}: latest checkpoint in train_epoch of epoch 2, after step 45; "
        f"'phasetrain resume {tmp_path / 'run'}' continues from there")


def test_run_config_objects_are_accepted(tmp_path: pathlib.Path) -> None:
    cfg = RunConfig.from_dict({"run_dir": str(tmp_path / "run"), "train": {"epochs": 1, "progress_bar": False},
                               "checkpoint": {"every_epochs": 0}})
    data = digits()
    model = torch.nn.Linear(64, 10)
    Trainer(cfg, model=model, loss_fn=torch.nn.CrossEntropyLoss(), optimizer=torch.optim.SGD(model.parameters(), 0.1),
            train_data=data["train"]).run()
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_every_public_name_resolves_lazily_and_the_export_lists_agree() -> None:
    import phasetrain
    assert set(phasetrain.__all__) == set(phasetrain._MODULE_OF) | {"__version__"}
    for name in phasetrain.__all__:
        assert getattr(phasetrain, name) is not None
    with pytest.raises(AttributeError, match="module 'phasetrain' has no attribute 'Trainr'"):
        phasetrain.Trainr  # noqa: B018


class CountedDigits(torch.utils.data.TensorDataset):
    """The digits tensors behind a dataset type of its own (so loaded one sample at a time), counting the reads."""

    def __init__(self, dataset: torch.utils.data.TensorDataset) -> None:
        super().__init__(*dataset.tensors)
        self.reads = 0

    def __getitem__(self, index: Any) -> Any:
        self.reads += 1
        return super().__getitem__(index)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_tensor_dataset_is_read_a_batch_at_a_time_into_the_batches_sample_by_sample_reading_makes(
        workers: int) -> None:
    train = digits()["train"]
    assert type(train) is torch.utils.data.TensorDataset
    cfg = TrainConfig(batch_size=32, num_workers=workers)
    by_batch = [batch for batch in RunData({"train": train}, cfg, seed=0).train_batches(epoch=2)]
    counted = CountedDigits(train)
    by_sample = [batch for batch in RunData({"train": counted}, cfg, seed=0).train_batches(epoch=2)]
    assert len(by_batch) == len(by_sample) == 40
    # The same batches, bitwise, and of the same structure (torch's default collate makes a list).
    assert all(type(a) is type(b) is list and all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b, strict=True))
               for a, b in zip(by_batch, by_sample, strict=True))
    if workers == 0:  # a subclass, which may read its samples its own way, is read one sample at a time
        assert counted.reads == len(train)
    loaded = RunData({"train": train}, cfg, seed=0).train_batches(epoch=2).loader.dataset  # type: ignore[attr-defined]
    assert isinstance(loaded.dataset if isinstance(loaded, WorkerSeeded) else loaded, BatchIndexed)


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_a_tensor_dataset_of_another_layout_gives_the_contiguous_batches_stacking_gives(layout: str) -> None:
    generator = torch.Generator().manual_seed(0)
    if layout == "transposed":
        inputs = torch.randn(8, 64, generator=generator).t()
    else:
        inputs = torch.randn(64, 3, 4, 4, generator=generator).contiguous(memory_format=torch.channels_last)
    dataset = torch.utils.data.TensorDataset(inputs, torch.arange(64))
    cfg = TrainConfig(batch_size=16)
    batches = list(RunData({"train": dataset}, cfg, seed=0).train_batches(epoch=1))
    stacked = list(RunData({"train": CountedDigits(dataset)}, cfg, seed=0).train_batches(epoch=1))
    for ours, theirs in zip(batches, stacked, strict=True):
        assert torch.equal(ours[0], theirs[0]) and ours[0].stride() == theirs[0].stride()
