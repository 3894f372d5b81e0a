"""Build a run's parts from the config's import specs, letting objects passed to ``Trainer`` override them."""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from phasetrain.callbacks import Callback
from phasetrain.config import ImportSpec, RunConfig, SchedulerSpec
from phasetrain.data import check_dataset
from phasetrain.errors import CallbackError, ConfigError
from phasetrain.schedulers import RunLength, resolve_run_length


@dataclass
class Components:
    model: torch.nn.Module
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    datasets: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    callbacks: list[Callback] = field(default_factory=list)


def as_config(config: object) -> RunConfig:
    """A RunConfig from a RunConfig, a config file path, a dict, or None (all defaults)."""
    if config is None:
        return RunConfig()
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, str | os.PathLike):
        return RunConfig.from_file(pathlib.Path(config))
    if isinstance(config, Mapping):
        return RunConfig.from_dict(dict(config))
    raise ConfigError(f"Trainer(config): expected a RunConfig, a config file path or a dict, "
                      f"got {type(config).__name__}")


def build_components(cfg: RunConfig, *, model: torch.nn.Module | None, loss_fn: Any,
                     optimizer: torch.optim.Optimizer | None, train_data: Any, eval_data: Any,
                     metrics: Mapping[str, Any] | None) -> Components:
    model = model if model is not None else _build(cfg.model, "model", "Trainer(model=...)")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    loss_fn = loss_fn if loss_fn is not None else _build(cfg.loss, "loss", "Trainer(loss_fn=...)")
    if not callable(loss_fn):
        raise ConfigError(f"loss: expected a callable (outputs, targets) -> loss, got {type(loss_fn).__name__}")
    optimizer = _optimizer(cfg, model, optimizer)
    built_metrics = dict(metrics) if metrics is not None else {
        name: spec.build(what=f"metrics.{name}") for name, spec in cfg.metrics.items()}
    for name, metric in built_metrics.items():
        _check_metric(name, metric)
    callbacks = [_callback(spec, i) for i, spec in enumerate(cfg.callbacks)]
    return Components(model, loss_fn, optimizer, build_datasets(cfg, train_data, eval_data),
                      built_metrics, callbacks)


def build_datasets(cfg: RunConfig, train_data: Any = None, eval_data: Any = None) -> dict[str, Any]:
    """``{"train": ..., "eval"?: ..., "test"?: ...}`` from the config's ``data`` and the datasets given, each checked once."""
    datasets: dict[str, Any] = {}
    if train_data is None or cfg.data is not None:  # the config's data may still bring eval/test splits
        built = _build(cfg.data, "data", "Trainer(train_data=..., eval_data=...)")
        if not isinstance(built, Mapping) or "train" not in built:
            raise ConfigError(f"data: {cfg.data.target if cfg.data else ''} must return a dict with a 'train' "
                              f"dataset (and optional 'eval', 'test'); got {type(built).__name__}"
                              + (f" with keys {sorted(built)}" if isinstance(built, Mapping) else ""))
        unknown = set(built) - {"train", "eval", "test"}
        if unknown:
            raise ConfigError(f"data: unexpected keys {sorted(unknown)}; expected 'train', 'eval', 'test'")
        datasets.update({split: ds for split, ds in built.items() if ds is not None or split == "train"})
    if train_data is not None:
        datasets["train"] = train_data
    if eval_data is not None:
        datasets["eval"] = eval_data
    for split, dataset in datasets.items():
        check_dataset(dataset, f"{split} dataset")
    return datasets


def build_scheduler(spec: SchedulerSpec | None, optimizer: torch.optim.Optimizer, length: RunLength) -> Any:
    """The config's scheduler for ``optimizer``, its run-length placeholders (``"{total_steps}"``) filled in."""
    if spec is None:
        return None
    args = resolve_run_length(spec.args, length, "scheduler.args")
    return spec.model_copy(update={"args": args}).build(optimizer, what="scheduler")


def _build(spec: ImportSpec | None, name: str, alternative: str, *leading: Any) -> Any:
    if spec is None:
        raise ConfigError(f"no {name}: set '{name}: {{target: module:attr, args: {{...}}}}' in the config "
                          f"or pass {alternative}")
    return spec.build(*leading, what=name)


def _optimizer(cfg: RunConfig, model: torch.nn.Module, given: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
    if given is None:
        optimizer = _build(cfg.optimizer, "optimizer", "Trainer(optimizer=...)", model.parameters())
    else:
        optimizer = given
        owned = {id(p) for p in model.parameters()}
        if any(id(p) not in owned for group in optimizer.param_groups for p in group["params"]):
            raise ConfigError("optimizer: the optimizer passed holds parameters that are not the model's; "
                              "pass the model it was built for as Trainer(model=...)")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def _check_metric(name: str, metric: Any) -> None:
    missing = [m for m in ("update", "compute", "reset", "to") if not callable(getattr(metric, m, None))]
    if missing:
        raise ConfigError(f"metrics.{name}: a {type(metric).__name__} has no {', '.join(missing)}; expected a "
                          "torchmetrics.Metric (e.g. torchmetrics.classification:MulticlassAccuracy)")


def _callback(spec: ImportSpec, index: int) -> Callback:
    callback = spec.build(what=f"callbacks[{index}]")
    if not isinstance(callback, Callback):
        raise CallbackError(f"callbacks[{index}]: {spec.target} built a {type(callback).__name__}, "
                            "expected a phasetrain.Callback")
    return callback
