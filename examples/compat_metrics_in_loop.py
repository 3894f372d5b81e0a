"""A pytorch-accelerated script run on phasetrain: accuracy computed inside a Trainer subclass.

    python examples/compat_metrics_in_loop.py

The same shape as pytorch-accelerated's ``train_with_metrics_in_loop.py``, on scikit-learn's bundled digits
(no download) instead of MNIST. Only the ``from phasetrain.compat ...`` lines differ from the
pytorch-accelerated version of this script: put ``pytorch_accelerated`` there and it runs unchanged.
"""
from __future__ import annotations

import pathlib
import sys

import torch
from torch import nn, optim
from torchmetrics import Accuracy

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from examples.digits import make_data
from phasetrain.compat import Trainer


class DigitsModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Linear(in_features=64, out_features=128),
            nn.ReLU(),
            nn.Linear(in_features=128, out_features=64),
            nn.ReLU(),
            nn.Linear(in_features=64, out_features=10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class TrainerWithAccuracy(Trainer):
    def __init__(self, num_classes: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # an nn.Module attribute of the trainer: the default MoveModulesToDeviceCallback puts it on the
        # training device at the start of each run
        self.accuracy = Accuracy(task="multiclass", num_classes=num_classes)

    def calculate_eval_batch_loss(self, batch) -> dict:
        batch_output = super().calculate_eval_batch_loss(batch)
        self.accuracy.update(batch_output["model_outputs"].argmax(dim=-1), batch[1])
        return batch_output

    def eval_epoch_end(self) -> None:
        self.run_history.update_metric("accuracy", self.accuracy.compute().item())
        self.accuracy.reset()


def main(num_epochs: int = 3, seed: int | None = None) -> float:
    """Train, evaluating after every epoch; return the last epoch's eval accuracy.

    ``seed`` draws only the initial weights (the data split is fixed; the trainer seeds its own shuffling).
    """
    datasets = make_data(seed=0)
    if seed is not None:
        torch.manual_seed(seed)
    model = DigitsModel()
    optimizer = optim.Adam(model.parameters(), lr=1e-2)
    loss_func = nn.CrossEntropyLoss()

    trainer = TrainerWithAccuracy(model=model, loss_func=loss_func, optimizer=optimizer, num_classes=10)

    trainer.train(
        train_dataset=datasets["train"],
        eval_dataset=datasets["eval"],
        num_epochs=num_epochs,
        per_device_batch_size=32,
        # the data is already in memory: worker processes (by default one per CPU, started afresh for
        # every epoch of each loader) cost more to start than the whole epoch takes
        train_dataloader_kwargs={"num_workers": 0},
        eval_dataloader_kwargs={"num_workers": 0},
    )
    return trainer.run_history.get_latest_metric("accuracy")


if __name__ == "__main__":
    print(f"final eval accuracy: {main():.4f}")
