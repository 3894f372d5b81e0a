"""Using a run after training: its config, history and files, and its model with the weights it trained.

    from phasetrain import load_model, load_run

    model = load_model("runs/digits")                    # the final weights, in eval mode, on the CPU
    best = load_model("runs/digits", weights="best")     # or "latest", "ema", a checkpoint's name or folder
    run = load_run("runs/digits")
    run.history.get_latest_metric("test/accuracy")       # 0.974

A run folder holds everything this needs: ``config.yaml`` names the model, the weights files hold what
it learnt. Nothing is written into the folder. A model given to the trainer as a Python object is not in
the config: pass one of the same architecture (``load_model(run_dir, model=MyNet())``).
"""
from __future__ import annotations

import functools
import os
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from phasetrain.config import RunConfig
from phasetrain.curves import read_records
from phasetrain.errors import RunDirError
from phasetrain.history import RunHistory, add_record
from phasetrain.run_folder import RunFolder

if TYPE_CHECKING:
    import torch

#: The names ``load_model(weights=...)`` takes besides a checkpoint's name or folder.
WEIGHTS = ("final", "best", "latest", "ema")


@dataclass(frozen=True)
class SavedRun:
    """A run folder as ``load_run`` reads it. Paths are None where the run has no such file (yet)."""

    path: pathlib.Path
    config: RunConfig
    history: RunHistory  # every epoch-level metric, as the run's trainer returned it
    records: list[dict[str, Any]] = field(repr=False)  # every line of metrics.jsonl
    finished: bool
    final_weights: pathlib.Path | None
    best_weights: pathlib.Path | None
    ema_weights: pathlib.Path | None

    @functools.cached_property
    def checkpoints(self) -> list[pathlib.Path]:
        """The run's checkpoint folders, oldest first."""
        return self._checkpoint_folder.all()

    @functools.cached_property
    def latest_checkpoint(self) -> pathlib.Path | None:
        """The checkpoint ``checkpoints/latest`` names (else the newest): where a resume starts, if it is intact."""
        return self._checkpoint_folder.latest()

    @property
    def _checkpoint_folder(self) -> Any:
        from phasetrain.checkpoint import Checkpoints
        return Checkpoints(RunFolder(self.path).checkpoints, self.config.checkpoint, process=None)

    def weights_file(self, weights: str | os.PathLike[str] = "final") -> pathlib.Path:
        """The safetensors file ``load_model(weights=...)`` reads; a RunDirError says why one is missing."""
        if weights == "final":
            if self.final_weights is None:
                raise RunDirError(f"run {self.path} is not finished, so it has no final weights (model.safetensors); "
                                  "use weights='latest' (its latest checkpoint) or weights='best'")
            return self.final_weights
        if weights == "best":
            if self.best_weights is None:
                why = ("checkpoint.keep_best is 0" if self.config.checkpoint.keep_best == 0 else
                       f"no checkpoint has been ranked by {self.config.checkpoint.monitor} yet")
                raise RunDirError(f"run {self.path} has no best weights (best.safetensors): {why}; use "
                                  "weights='final' or weights='latest'")
            return self.best_weights
        if weights == "ema":
            if self.ema_weights is None:
                why = ("it was trained without the EMA callback" if self.finished else
                       "the EMA callback writes it when the run finishes; use weights='latest' meanwhile")
                raise RunDirError(f"run {self.path} has no EMA weights (ema.safetensors): {why}")
            return self.ema_weights
        from phasetrain.checkpoint import BEST_MODULE, intact
        checkpoint = self._checkpoint(weights)
        intact(checkpoint)  # the files are as written: a corrupt one is named, not loaded
        return checkpoint / f"{BEST_MODULE}.safetensors"

    def _checkpoint(self, weights: str | os.PathLike[str]) -> pathlib.Path:
        if weights == "latest":
            if self.latest_checkpoint is None:
                raise RunDirError(f"run {self.path} has no checkpoint yet; use weights='final' once it has finished")
            return self.latest_checkpoint
        path, folder = pathlib.Path(weights), RunFolder(self.path).checkpoints
        if len(path.parts) == 1 and (folder / path).is_dir():
            return folder / path
        if path.is_dir():
            return path
        names = ", ".join(c.name for c in self.checkpoints) or "none"
        raise RunDirError(f"weights={str(weights)!r}: expected one of {', '.join(WEIGHTS)}, or a checkpoint's name or "
                          f"folder (run {self.path} has: {names})")


def load_run(run_dir: str | os.PathLike[str]) -> SavedRun:
    """Read the run folder ``run_dir``: its config, history, records and the paths of its weights and checkpoints."""
    folder = RunFolder(pathlib.Path(run_dir))
    if not folder.config_file.is_file():
        raise RunDirError(f"{run_dir} is not a run folder: it has no {folder.config_file.name}")
    config = RunConfig.from_file(folder.config_file)
    config.run_dir = folder.path  # set, not parsed: a folder named like a number stays a path
    records = read_records(folder.path)
    history = RunHistory()
    for record in records:
        add_record(history, record)
    return SavedRun(
        path=folder.path, config=config, history=history, records=records, finished=folder.finished,
        final_weights=_existing(folder.final_weights), best_weights=_existing(folder.best_weights),
        ema_weights=_existing(folder.ema_weights))


def load_model(run_dir: str | os.PathLike[str], weights: str | os.PathLike[str] = "final", *,
               model: torch.nn.Module | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of the run in ``run_dir`` with the ``weights`` it trained, in eval mode, on ``device``.

    ``weights``: ``"final"`` (``model.safetensors``, written when the run finished), ``"best"``
    (``best.safetensors``, the best checkpoint's by ``checkpoint.monitor``), ``"latest"`` (the checkpoint a
    resume would continue from), ``"ema"`` (the EMA callback's average), or a checkpoint's name or folder.
    The model is built from the run's config, or given as ``model`` (required when it was trained from a
    Python object)."""
    from phasetrain.checkpoint import load_module, read_weights
    run = load_run(run_dir)
    path = run.weights_file(weights)
    if model is None:
        if run.config.model is None:
            raise RunDirError(f"run {run.path} was trained with a model given as a Python object, which its config.yaml "
                              "does not name; pass one of the same architecture: load_model(run_dir, model=MyNet())")
        model = run.config.model.build(what="model")
    load_module(model, path, read_weights(path), requires_grad={})  # a model that does not fit: its keys named
    return model.eval().to(device)


def _existing(path: pathlib.Path) -> pathlib.Path | None:
    return path if path.is_file() else None


#: The splits ``evaluate_run`` and ``predict_run`` take, as the run's data names them.
SPLITS = ("test", "eval", "train")


def evaluate_run(run: SavedRun, split: str = "test", weights: str | os.PathLike[str] = "final",
                 batch_size: int | None = None) -> dict[str, float]:
    """Loss and every metric of the run's config on ``split`` of its data, with ``weights``: what
    ``phasetrain evaluate`` prints. Every process of a launch calls it; each sample counts once."""
    from phasetrain.accelerator import release
    trainer, dataset = _trainer_for(run, split, weights, batch_size)
    try:
        return {f"{split}/{name}": value for name, value in trainer.evaluate(dataset).items()}
    finally:
        release(trainer)


def predict_run(run: SavedRun, split: str = "test", weights: str | os.PathLike[str] = "final",
                batch_size: int | None = None) -> Any:
    """The model's outputs for every sample of ``split``, in dataset order, gathered from every process."""
    from phasetrain.accelerator import release
    trainer, dataset = _trainer_for(run, split, weights, batch_size)
    try:
        return trainer.predict(dataset)
    finally:
        release(trainer)


def _trainer_for(run: SavedRun, split: str, weights: str | os.PathLike[str], batch_size: int | None) -> tuple[Any, Any]:
    """A Trainer of the run's config with ``weights`` loaded, and the dataset ``split``. It writes nothing: no run
    folder is claimed (run() is never called) and no tracker is started."""
    from phasetrain.accelerator import bare_model
    from phasetrain.checkpoint import load_module, read_weights
    from phasetrain.trainer import Trainer
    data = run.config.data
    if data is None:
        raise RunDirError(f"run {run.path} was trained on datasets given as Python objects, which its config.yaml "
                          "does not name; evaluate it from Python: Trainer(config, ...).evaluate(dataset) after "
                          "load_model")
    if split not in SPLITS:
        raise RunDirError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    path = run.weights_file(weights)  # before anything is built: a missing file is answered at once
    config = run.config.model_copy(deep=True)
    # Only the model, the data, the loss and the metrics: no tracker, no phases or callbacks of the run's (a
    # Freeze phase refuses several processes), every batch of the split.
    config.tracking.log_with, config.phases, config.callbacks = [], [], []
    config.train.limit_batches = None
    if batch_size is not None:
        config.train.eval_batch_size = batch_size
    trainer = Trainer(config)
    dataset = getattr(trainer.data, split)
    if dataset is None:
        raise RunDirError(f"the data of run {run.path} ({data.target}) has no {split} split")
    load_module(bare_model(trainer.accelerator, trainer.model), path, read_weights(path), requires_grad={})
    return trainer, dataset


def write_predictions(outputs: Any, path: pathlib.Path) -> None:
    """``outputs`` to ``path``: ``.pt`` (torch.save, any outputs), ``.npy`` or ``.csv`` (a tensor: a row per sample)."""
    import torch
    if path.suffix.lower() == ".pt":
        torch.save(outputs, path)
        return
    if not isinstance(outputs, torch.Tensor):
        raise RunDirError(f"-o {path}: the model's outputs are a {type(outputs).__name__}, not a tensor; write them to "
                          "a .pt file")
    rows = outputs.detach().cpu().reshape(len(outputs), -1)
    if path.suffix.lower() == ".npy":
        import numpy as np
        with open(path, "wb") as file:  # given a name, numpy.save would add .npy to P.NPY
            np.save(file, outputs.detach().cpu().numpy())
        return
    header = ",".join(["index", *(f"output_{i}" for i in range(rows.shape[1]))])
    lines = [header, *(",".join([str(index), *(repr(float(v)) for v in row)]) for index, row in enumerate(rows.tolist()))]
    path.write_text("\n".join(lines) + "\n")
