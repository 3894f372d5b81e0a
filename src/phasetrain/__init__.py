"""phasetrain: train PyTorch models with a loop that is an explicit, resumable phase graph."""
from __future__ import annotations

__version__ = "0.1.0"

from phasetrain.callbacks import Callback, ConsoleSummary, EarlyStopping, HistoryRecorder, MetricsFile, ProgressBar
from phasetrain.checkpoint import RunInterrupted
from phasetrain.conditions import Condition, every_n_epochs, every_n_steps, on_epoch, on_last_epoch
from phasetrain.config import CheckpointConfig, ImportSpec, RunConfig, TrainConfig
from phasetrain.errors import (
    CallbackError,
    CheckpointError,
    ConfigError,
    DataError,
    GraphError,
    PhasetrainError,
    RunDirError,
)
from phasetrain.graph import PhaseGraph
from phasetrain.history import RunHistory
from phasetrain.phases import Phase, TestPhase
from phasetrain.state import RunState
from phasetrain.trainer import Trainer

__all__ = [
    "Callback", "CallbackError", "CheckpointConfig", "CheckpointError", "Condition", "ConfigError",
    "ConsoleSummary", "DataError", "EarlyStopping", "GraphError", "HistoryRecorder", "ImportSpec", "MetricsFile",
    "Phase", "PhaseGraph", "PhasetrainError", "ProgressBar", "RunConfig", "RunDirError", "RunHistory",
    "RunInterrupted", "RunState", "TestPhase", "TrainConfig", "Trainer", "__version__", "every_n_epochs",
    "every_n_steps", "on_epoch", "on_last_epoch",
]
