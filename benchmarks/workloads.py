"""What the suite trains: the models and the random datasets of each workload, importable by every loop.

A phasetrain config names the models by import spec (``benchmarks.workloads:tiny_model``); the other loops call
the same factories. Only torch is imported here, so a child that times ignite or Lightning loads no phasetrain.
"""
from __future__ import annotations

import dataclasses
import importlib

import torch
from torch import nn
from torch.utils.data import TensorDataset

CLASSES = 10


def tiny_model() -> nn.Module:
    """An MLP 64-128-64-10: each step is so small that the loop around it is most of its cost."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, CLASSES))


def heavy_model() -> nn.Module:
    """An MLP 784-1024-1024-10: each step is matrix work, and the loop around it should not show."""
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, CLASSES))


def cnn_model() -> nn.Module:
    """A small CNN for 3x64x64 images (the GPU variant, benchmarks/gpu.py)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(128, CLASSES),
    )


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model, its optimizer's learning rate (plain SGD), and random data of ``steps_per_epoch`` batches."""

    name: str
    model: str  # 'module:attribute' of the model factory, as a phasetrain config names it
    sample_shape: tuple[int, ...]
    batch_size: int
    steps_per_epoch: int
    epochs: int
    lr: float = 0.01

    @property
    def samples(self) -> int:
        return self.batch_size * self.steps_per_epoch

    def build_model(self) -> nn.Module:
        module, _, attribute = self.model.partition(":")
        factory = getattr(importlib.import_module(module), attribute)
        model: nn.Module = factory()
        return model

    def dataset(self) -> TensorDataset:
        """Random inputs and labels, the same on every run (their own generator, seeded 0)."""
        return random_data(self.sample_shape, self.samples)


WORKLOADS = {
    "tiny": Workload("tiny", "benchmarks.workloads:tiny_model", (64,), batch_size=32, steps_per_epoch=256, epochs=6),
    "heavy": Workload("heavy", "benchmarks.workloads:heavy_model", (784,), batch_size=256, steps_per_epoch=32,
                      epochs=4),
    "cnn": Workload("cnn", "benchmarks.workloads:cnn_model", (3, 64, 64), batch_size=256, steps_per_epoch=32,
                    epochs=4),
}


def random_data(sample_shape: tuple[int, ...], samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(samples, *sample_shape, generator=generator),
                         torch.randint(0, CLASSES, (samples,), generator=generator))


def splits(workload: str, steps_per_epoch: int | None = None) -> dict[str, TensorDataset]:
    """A config's ``data:`` for ``workload``: its train set alone (no eval set)."""
    chosen = WORKLOADS[workload]
    if steps_per_epoch is not None:
        chosen = dataclasses.replace(chosen, steps_per_epoch=steps_per_epoch)
    return {"train": chosen.dataset()}
