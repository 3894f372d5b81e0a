"""phasetrain: train PyTorch models with a loop that is an explicit, resumable phase graph.

The names below are imported on first use, so ``import phasetrain`` (and ``phasetrain plan`` or
``phasetrain --help``) do not pay for torch, accelerate or the trainer until something needs them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

_EXPORTS = {
    "phasetrain.callbacks": ("Callback", "ConsoleSummary", "EarlyStopping", "HistoryRecorder", "MetricsFile",
                             "ProgressBar"),
    "phasetrain.conditions": ("Condition", "every_n_epochs", "every_n_steps", "on_epoch", "on_last_epoch"),
    "phasetrain.config": ("CheckpointConfig", "ImportSpec", "RunConfig", "TrainConfig"),
    "phasetrain.ema": ("EMA",),
    "phasetrain.errors": ("CallbackError", "CheckpointError", "ConfigError", "CorruptCheckpoint", "DataError",
                          "GraphError", "NonFiniteLossError", "PhasetrainError", "RunDirError"),
    "phasetrain.finetuning": ("Freeze",),
    "phasetrain.graph": ("PhaseGraph",),
    "phasetrain.history": ("RunHistory",),
    "phasetrain.phases": ("Phase", "TestPhase"),
    "phasetrain.runs": ("SavedRun", "load_model", "load_run"),
    "phasetrain.signals": ("RunInterrupted",),
    "phasetrain.state": ("RunState",),
    "phasetrain.trainer": ("Trainer",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "EMA", "Callback", "CallbackError", "CheckpointConfig", "CheckpointError", "Condition", "ConfigError",
    "ConsoleSummary", "CorruptCheckpoint", "DataError", "EarlyStopping", "Freeze", "GraphError", "HistoryRecorder",
    "ImportSpec", "MetricsFile", "NonFiniteLossError", "Phase", "PhaseGraph", "PhasetrainError", "ProgressBar", "RunConfig", "RunDirError", "RunHistory",
    "RunInterrupted", "RunState", "SavedRun", "TestPhase", "TrainConfig", "Trainer", "__version__", "every_n_epochs",
    "every_n_steps", "load_model", "load_run", "on_epoch", "on_last_epoch",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'phasetrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from phasetrain.callbacks import (
        Callback,
        ConsoleSummary,
        EarlyStopping,
        HistoryRecorder,
        MetricsFile,
        ProgressBar,
    )
    from phasetrain.conditions import Condition, every_n_epochs, every_n_steps, on_epoch, on_last_epoch
    from phasetrain.config import CheckpointConfig, ImportSpec, RunConfig, TrainConfig
    from phasetrain.ema import EMA
    from phasetrain.errors import (
        CallbackError,
        CheckpointError,
        ConfigError,
        CorruptCheckpoint,
        DataError,
        GraphError,
        NonFiniteLossError,
        PhasetrainError,
        RunDirError,
    )
    from phasetrain.finetuning import Freeze
    from phasetrain.graph import PhaseGraph
    from phasetrain.history import RunHistory
    from phasetrain.phases import Phase, TestPhase
    from phasetrain.runs import SavedRun, load_model, load_run
    from phasetrain.signals import RunInterrupted
    from phasetrain.state import RunState
    from phasetrain.trainer import Trainer
