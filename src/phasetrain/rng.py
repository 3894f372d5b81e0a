"""Every RNG a run touches: capture, restore, and a context that leaves them untouched."""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """The python, numpy, torch CPU and (if present) CUDA RNG states of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (a dry forward, a check) without moving any RNG the run depends on."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


class ProcessRNG:
    """This process's RNG streams as a checkpointable object: ``state_dict()`` captures them now as tensors
    and plain data (loadable with ``weights_only=True``), ``load_state_dict()`` restores them."""

    def state_dict(self) -> dict[str, Any]:
        state = capture_rng()
        kind, keys, pos, has_gauss, cached = state["numpy"]
        return {**state, "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                                   "has_gauss": has_gauss, "cached": cached}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = state["numpy"]
        restore_rng({**state, "numpy": (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                                        n["cached"])})
