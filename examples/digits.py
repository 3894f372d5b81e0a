"""The main job: an MLP on scikit-learn's bundled handwritten digits (1,797 8x8 images, no download).

Run it with ``phasetrain run examples/digits.yaml``, or from Python::

    from phasetrain import RunConfig, Trainer
    Trainer(RunConfig.from_file("examples/digits.yaml")).run()
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def make_model(hidden: int = 128, dropout: float = 0.1) -> nn.Module:
    """64 pixels in, 10 class logits out."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


def make_data(seed: int = 0, eval_fraction: float = 0.15, test_fraction: float = 0.15) -> dict[str, TensorDataset]:
    """Train/eval/test splits of the digits set, drawn by ``seed`` alone; pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    n_eval, n_test = int(len(order) * eval_fraction), int(len(order) * test_fraction)
    splits = {"eval": order[:n_eval], "test": order[n_eval:n_eval + n_test], "train": order[n_eval + n_test:]}
    return {name: TensorDataset(inputs[idx], targets[idx]) for name, idx in splits.items()}
