"""The run config: what to train, on what, for how long, and where the results go.

A ``RunConfig`` is plain pydantic v2 data, loadable from YAML, JSON or a dict, with dotted
``key=value`` overrides validated exactly like the file. Components (model, data, loss, optimizer,
scheduler, metrics) are *import specs*: ``{target: "module:attr", args: {...}}``.

Example::

    cfg = RunConfig.from_file("examples/digits.yaml", overrides=["train.epochs=3"])
"""
from __future__ import annotations

import difflib
import importlib
import json
import pathlib
import sys
from contextvars import ContextVar
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from phasetrain.errors import ConfigError

#: What error messages name as the config's source: the file or "config" while loading, else "RunConfig".
_SOURCE: ContextVar[str] = ContextVar("config_source", default="RunConfig")


class Section(BaseModel):
    """A config section: unknown keys refused, assignments validated, a bad assignment a ConfigError."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, type(self).__name__, type(self))) from None


class ImportSpec(Section):
    """A component named by import path: ``target`` is ``"package.module:attribute"``, called with ``args``."""

    target: str = Field(description="'module:attribute' of a class or function to call")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the call")

    @field_validator("target")
    @classmethod
    def _module_colon_attr(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"expected 'module:attribute' (e.g. 'torch.optim:AdamW'), got {value!r}")
        return value

    def resolve(self) -> Any:
        """Import and return the object ``target`` names; a ConfigError says which part failed."""
        module_name, _, attr_path = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import module {module_name!r} of target {self.target!r}: {exc}") from None
        except Exception as exc:  # a module that fails while importing (SyntaxError, ...): name it
            raise ConfigError(f"importing module {module_name!r} of target {self.target!r} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        for part in attr_path.split("."):
            if not hasattr(obj, part):
                raise ConfigError(f"module {module_name!r} has no attribute {attr_path!r} (target {self.target!r})")
            obj = getattr(obj, part)
        return obj

    def build(self, *leading: Any, what: str = "component") -> Any:
        """Call the target with ``leading`` positional arguments and ``args``; errors name the spec."""
        factory = self.resolve()
        if not callable(factory):
            raise ConfigError(f"{what}: target {self.target!r} is not callable")
        try:
            return factory(*leading, **self.args)
        except Exception as exc:
            raise ConfigError(f"{what}: calling {self.target} with args {self.args} failed: "
                              f"{type(exc).__name__}: {exc}") from exc


class SchedulerSpec(ImportSpec):
    """An LR scheduler, called with the optimizer first; stepped every optimizer step or every epoch."""

    interval: Literal["step", "epoch"] = "step"


class PhaseSpec(ImportSpec):
    """A custom phase: ``target`` builds a ``phasetrain.Phase``, inserted ``after`` a phase of the graph
    (default ``eval_epoch``), entered ``when`` a condition holds (``{every_n_epochs: 2}``, ``{all: [...]}``,
    ...), then on to what followed ``after`` (or to ``then``). With ``replace: <name>`` it takes the place
    of that phase instead, keeping its edges."""

    after: str | None = None
    when: dict[str, Any] | None = None
    then: str | None = None
    replace: str | None = Field(None, description="name of a phase this one replaces (its edges stay)")

    @model_validator(mode="after")
    def _replace_alone(self) -> PhaseSpec:
        given = [key for key in ("after", "when", "then") if getattr(self, key) is not None]
        if self.replace is not None and given:
            raise ValueError(f"replace={self.replace!r} keeps the replaced phase's edges; remove {', '.join(given)}")
        return self


class TrainConfig(Section):
    """How the train and eval epochs run. ``batch_size`` is per device (per process)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1, description="per device")
    eval_batch_size: int | None = Field(None, ge=1, description="per device; defaults to batch_size")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(None, gt=0, description="clip gradients to this total norm")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_workers: int = Field(0, ge=0)
    eval_every: int = Field(1, ge=1, description="evaluate every N epochs (and after the last epoch)")
    shuffle: bool = True
    drop_last: bool = False
    log_every_steps: int = Field(50, ge=0, description="log train/loss every N optimizer steps; 0 = per epoch only")
    progress_bar: bool = True

    @property
    def resolved_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size


class CheckpointConfig(Section):
    """When checkpoints are taken and which are kept."""

    every_epochs: int = Field(1, ge=0, description="checkpoint every N epochs (and after the last); 0 = never")
    every_steps: int | None = Field(None, ge=1, description="also checkpoint every N optimizer steps mid-epoch")
    keep_last: int = Field(2, ge=0)
    keep_best: int = Field(1, ge=0)
    monitor: str = Field("eval/loss", description="metric that ranks checkpoints for keep_best")
    mode: Literal["min", "max"] = "min"


class RunConfig(Section):
    """Everything a run needs; written to ``RUN_DIR/config.yaml`` so the folder alone can repeat the run."""

    run_dir: pathlib.Path = Field(pathlib.Path("runs/run"), description="where config, metrics and weights go")
    seed: int = 0
    overwrite: bool = Field(False, description="replace a run_dir that already holds a run")
    model: ImportSpec | None = None
    data: ImportSpec | None = Field(None, description="returns {'train': ds, 'eval': ds, 'test'?: ds}")
    loss: ImportSpec | None = None
    optimizer: ImportSpec | None = Field(None, description="called with the model's parameters first")
    scheduler: SchedulerSpec | None = None
    metrics: dict[str, ImportSpec] = Field(default_factory=dict, description="torchmetrics objects by name")
    callbacks: list[ImportSpec] = Field(default_factory=list)
    phases: list[PhaseSpec] = Field(default_factory=list, description="custom phases added to the graph")
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="before")
    @classmethod
    def _strings_are_targets(cls, data: Any) -> Any:
        # Let YAML say `loss: torch.nn:CrossEntropyLoss` for a spec without args.
        if isinstance(data, dict):
            data = {**data}
            for key in ("model", "data", "loss", "optimizer", "scheduler"):
                if isinstance(data.get(key), str):
                    data[key] = {"target": data[key]}
            if isinstance(data.get("metrics"), dict):
                data["metrics"] = {k: {"target": v} if isinstance(v, str) else v for k, v in data["metrics"].items()}
            for key in ("callbacks", "phases"):
                if isinstance(data.get(key), list):
                    data[key] = [{"target": v} if isinstance(v, str) else v for v in data[key]]
        return data

    # ---- loading ------------------------------------------------------------------------------
    def __init__(self, **data: Any) -> None:
        # Pydantic calls this for RunConfig(...) and for from_dict/from_file alike: one ConfigError for all.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, _SOURCE.get())) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> RunConfig:
        """Validate ``data`` with ``key=value`` overrides applied; raise one ConfigError naming each bad field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys at the top level, got {type(data).__name__}")
        merged = apply_overrides(data, overrides or [])
        token = _SOURCE.set(source)
        try:
            return cls(**merged)
        finally:
            _SOURCE.reset(token)

    @classmethod
    def from_file(cls, path: str | pathlib.Path, overrides: list[str] | None = None) -> RunConfig:
        """Load a ``.yaml``/``.yml``/``.json`` config; relative ``run_dir`` stays relative to the working folder."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
        return cls.from_dict(data or {}, overrides, source=str(path))

    def with_overrides(self, overrides: list[str]) -> RunConfig:
        """A copy with dotted ``key=value`` overrides applied and validated."""
        return RunConfig.from_dict(self.to_dict(), overrides, source="overrides")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML scalars/lists/maps."""
    result = json.loads(json.dumps(data, default=str))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected 'dotted.key=value', e.g. 'train.epochs=3'")
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    return result


def describe_validation_error(exc: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    """Turn pydantic's error list into short lines: where, what was wrong, what is expected."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key{_did_you_mean(err['loc'], root or RunConfig)}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) or err["type"] == "value_error" else f" (got {got!r})"
            lines.append(f"{loc}: {err['msg']}{shown}")
    head = f"{source}: invalid config" if len(lines) > 1 else f"{source}: invalid config:"
    return head + (" " + lines[0] if len(lines) == 1 else "".join(f"\n  {line}" for line in lines))


def _did_you_mean(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    section: type[BaseModel] | None = root
    for part in loc[:-1]:
        field = section.model_fields.get(str(part)) if section else None
        ann = field.annotation if field else None
        section = next((t for t in (ann, *getattr(ann, "__args__", ())) if isinstance(t, type) and issubclass(t, BaseModel)), None)
    if section is None:
        return ""
    known = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f", did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known keys: {', '.join(known)})"


def ensure_importable_cwd() -> None:
    """Make ``examples.digits:...`` style targets importable when running from a project folder."""
    cwd = str(pathlib.Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
