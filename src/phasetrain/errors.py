"""The exceptions phasetrain raises for bad input: one readable message each, no traceback needed."""
from __future__ import annotations


class PhasetrainError(Exception):
    """Base class: something the user gave (config, data, model, checkpoint) is not what the run needs.

    The CLI prints these as one line (``phasetrain: error: ...``) instead of a traceback.
    """


class ConfigError(PhasetrainError, ValueError):
    """The run config has an unknown key, a wrong type, a bad value or an import spec that does not resolve."""


class DataError(PhasetrainError, ValueError):
    """A dataset is missing, empty or yields batches the model/loss cannot use."""


class RunDirError(PhasetrainError):
    """The run folder cannot be used as asked (for example it already holds a finished run)."""


class CallbackError(PhasetrainError, TypeError):
    """A callback defines a hook that does not exist or names a phase that is not in the graph."""


class CheckpointError(PhasetrainError):
    """A checkpoint is missing, truncated, corrupted, unsafe to load or does not match the model."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files are not what was written: missing, truncated, altered, absent from its manifest,
    or refused by the loader (a pickle that is not plain data, a bad safetensors header).

    ``resume="latest"`` skips a corrupt checkpoint for an older intact one, with a warning. A checkpoint
    that is intact but does not fit the run (another model, another format version) is a plain
    CheckpointError: an older one would not fit either.
    """


class GraphError(PhasetrainError, ValueError):
    """The phase graph is invalid: an unknown phase, an unreachable one, or a cycle that never advances."""


class NonFiniteLossError(PhasetrainError, FloatingPointError):
    """A training loss was NaN or infinite; the run stopped before the weights were updated."""


class LaunchError(PhasetrainError):
    """The processes of a distributed launch do not agree with what accelerate sees, or a launch failed."""
