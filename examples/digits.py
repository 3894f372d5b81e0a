"""The main job: an MLP on scikit-learn's bundled handwritten digits (1,797 8x8 images, no download).

Run it with ``phasetrain run examples/digits.yaml``, or from Python::

    from phasetrain import RunConfig, Trainer
    Trainer(RunConfig.from_file("examples/digits.yaml")).run()
"""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
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
    pixels, labels = load_digits()
    inputs = torch.tensor(pixels, dtype=torch.float32) / 16.0
    targets = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    n_eval, n_test = int(len(order) * eval_fraction), int(len(order) * test_fraction)
    splits = {"eval": order[:n_eval], "test": order[n_eval:n_eval + n_test], "train": order[n_eval + n_test:]}
    return {name: TensorDataset(inputs[idx], targets[idx]) for name, idx in splits.items()}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (pixels, labels), read from the file scikit-learn ships.

    The same arrays as ``sklearn.datasets.load_digits()``, without importing scikit-learn, which takes
    ~0.9 s here (reading the file takes ~20 ms): every run and every ``phasetrain plan`` of this
    example pays that otherwise.
    """
    spec = importlib.util.find_spec("sklearn")
    bundled = pathlib.Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if bundled is None or not bundled.is_file():  # another layout: let scikit-learn find it
        from sklearn.datasets import load_digits as sklearn_load_digits
        digits = sklearn_load_digits()
        return digits.data, digits.target
    data = np.loadtxt(bundled, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)
