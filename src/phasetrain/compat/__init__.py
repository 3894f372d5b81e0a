"""phasetrain's drop-in layer for pytorch-accelerated scripts: replace ``pytorch_accelerated`` by
``phasetrain.compat`` in the import lines and the script runs on phasetrain's phase graph.

The submodules have pytorch-accelerated's paths: ``phasetrain.compat.trainer``, ``.callbacks``,
``.schedulers``, ``.tracking``, ``.run_config``, ``.utils``. docs/migrating-from-pytorch-accelerated.md
maps every name and lists each intentional difference.
"""
from __future__ import annotations

from accelerate import notebook_launcher
from accelerate.utils import set_seed

from phasetrain.compat.callbacks import (
    CallbackHandler,
    ConvertSyncBatchNormCallback,
    EarlyStoppingCallback,
    LimitBatchesCallback,
    LogMetricsCallback,
    MoveModulesToDeviceCallback,
    PrintProgressCallback,
    ProgressBarCallback,
    SaveBestModelCallback,
    StopTrainingError,
    TerminateOnNaNCallback,
    TrainerCallback,
    get_default_callbacks,
)
from phasetrain.compat.run_config import TrainerRunConfig
from phasetrain.compat.tracking import InMemoryRunHistory, RunHistory
from phasetrain.compat.trainer import DEFAULT_CALLBACKS, Trainer, TrainerPlaceholderValues

# As pytorch-accelerated does on import: scripts written for it build their model after the imports and
# rely on this for the same initial weights every run. phasetrain itself never seeds on import.
set_seed(42)

__all__ = [
    "DEFAULT_CALLBACKS", "CallbackHandler", "ConvertSyncBatchNormCallback", "EarlyStoppingCallback",
    "InMemoryRunHistory", "LimitBatchesCallback", "LogMetricsCallback", "MoveModulesToDeviceCallback",
    "PrintProgressCallback", "ProgressBarCallback", "RunHistory", "SaveBestModelCallback", "StopTrainingError",
    "TerminateOnNaNCallback", "Trainer", "TrainerCallback", "TrainerPlaceholderValues", "TrainerRunConfig",
    "get_default_callbacks", "notebook_launcher",
]
