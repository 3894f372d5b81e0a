"""Which checkpoints are kept: the newest ones and the best by the monitored metric, ranked only when fresh."""
from __future__ import annotations

import pathlib

from phasetrain import Trainer
from tests.conftest import digits_config


def kept(run_dir: pathlib.Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()}


def test_retention_keeps_the_newest_and_the_best_even_when_the_best_is_an_early_one(tmp_path: pathlib.Path) -> None:
    # mode max on the eval loss makes the first epoch the best: it must survive keep_last=2.
    config = digits_config(tmp_path / "run", train={"epochs": 5},
                           checkpoint={"every_epochs": 1, "keep_last": 2, "keep_best": 1, "monitor": "eval/loss",
                                       "mode": "max"})
    trainer = Trainer(config)
    losses = trainer.run().get_metric_values("eval/loss")
    best_epoch = losses.index(max(losses)) + 1
    assert best_epoch not in (4, 5)
    steps = trainer.data.steps_per_epoch
    assert kept(tmp_path / "run") == {f"epoch{e:03d}-step{e * steps:07d}-checkpoint" for e in (4, 5, best_epoch)}
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"epoch005-step{5 * steps:07d}-checkpoint"


def test_keep_best_ranks_only_checkpoints_taken_right_after_an_evaluation(tmp_path: pathlib.Path) -> None:
    # Mid-epoch checkpoints at steps 15, 30, 45, ... come after an older evaluation: ranking them by it would
    # tie them with the best epoch-end checkpoint (epoch 1's, by mode max) and push that one out.
    config = digits_config(tmp_path / "run", train={"epochs": 3},
                           checkpoint={"every_epochs": 1, "every_steps": 15, "keep_last": 1, "keep_best": 1,
                                       "monitor": "eval/loss", "mode": "max"})
    losses = Trainer(config).run().get_metric_values("eval/loss")
    best_epoch = losses.index(max(losses)) + 1
    assert best_epoch != 3
    assert kept(tmp_path / "run") == {f"epoch{best_epoch:03d}-step{best_epoch * 40:07d}-checkpoint",
                                      "epoch003-step0000120-checkpoint"}


def test_without_keep_best_only_the_newest_are_kept(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 3},
                           checkpoint={"every_epochs": 1, "keep_last": 1, "keep_best": 0})
    Trainer(config).run()
    assert kept(tmp_path / "run") == {"epoch003-step0000120-checkpoint"}
