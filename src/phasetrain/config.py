"""The run config: what to train, on what, for how long, and where the results go.

A ``RunConfig`` is plain pydantic v2 data, loadable from YAML, JSON or a dict, with dotted
``key=value`` overrides validated exactly like the file. Components (model, data, loss, optimizer,
scheduler, metrics) are *import specs*: ``{target: "module:attr", args: {...}}``.

Example::

    cfg = RunConfig.from_file("examples/digits.yaml", overrides=["train.epochs=3"])
"""
from __future__ import annotations

import datetime
import difflib
import importlib
import json
import pathlib
import sys
import typing
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from phasetrain.config_files import DuplicateKey, load_yaml, one_line, read_config_file
from phasetrain.errors import ConfigError

#: What error messages name as the config's source: the file or "config" while loading, else "RunConfig".
_SOURCE: ContextVar[str] = ContextVar("config_source", default="RunConfig")

#: The largest seed: accelerate's ``set_seed`` seeds numpy too, which takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1

#: The error type of a run_dir that YAML read as a number or a boolean (its message shows the value).
_LOST_TEXT = "run_dir_lost_text"


class Section(BaseModel):
    """A config section: unknown keys refused, assignments validated, a bad assignment a ConfigError.

    Number and boolean fields are strict (``StrictInt``, ``StrictBool``, ``StrictFloat``): pydantic's lax
    mode would read ``epochs: true`` as 1, ``overwrite: 1`` as true and a quoted ``"3"`` as 3, so a typo
    would train something other than what the config says. A float field still takes a whole number.
    """

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
            raise ConfigError(f"cannot import module {module_name!r} of target {self.target!r}: {exc}"
                              f"{_shadowed(module_name)}") from None
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


#: Schedulers the config may name without a module (``scheduler: {target: warmup_cosine, ...}``).
SCHEDULER_NAMES = {"warmup_cosine": "phasetrain.schedulers:warmup_cosine"}


class SchedulerSpec(ImportSpec):
    """An LR scheduler, called with the optimizer first; stepped every optimizer step or every epoch.

    ``args`` may hold the run's length as placeholders, replaced when the run is built:
    ``total_steps: "{total_steps}"`` (see ``phasetrain.schedulers.RunLength`` for every name).
    """

    interval: Literal["step", "epoch"] = "step"

    @field_validator("target", mode="before")
    @classmethod
    def _named_scheduler(cls, value: Any) -> Any:
        return SCHEDULER_NAMES.get(value, value) if isinstance(value, str) else value


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

    epochs: StrictInt = Field(10, ge=1)
    batch_size: StrictInt = Field(32, ge=1, description="per device")
    eval_batch_size: StrictInt | None = Field(None, ge=1, description="per device; defaults to batch_size")
    grad_accum_steps: StrictInt = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: StrictFloat | None = Field(None, gt=0, description="clip gradients to this total norm")
    max_grad_value: StrictFloat | None = Field(None, gt=0, description="clip each gradient value to +-this")
    max_steps: StrictInt | None = Field(None, ge=1, description="end the run after this many optimizer steps "
                                        "(mid-epoch if need be), or at train.epochs, whichever comes first")
    limit_batches: StrictInt | None = Field(None, ge=1, description="debugging: train and evaluate on the first "
                                            "N batches of each epoch only")
    fast_dev_run: StrictBool = Field(False, description="debugging: one batch of each phase, one epoch, "
                                     "nothing written to run_dir")
    sync_batchnorm: StrictBool = Field(False, description="convert BatchNorm layers to SyncBatchNorm when "
                                       "running on several processes")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    compile: StrictBool = Field(False, description="compile the model with torch.compile: faster steps after the "
                                "first ones, which compile; checkpoints hold the uncompiled model's weights")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile's mode (with compile: true)")
    num_workers: StrictInt = Field(0, ge=0)
    eval_every: StrictInt = Field(1, ge=1, description="evaluate every N epochs (and after the last epoch)")
    shuffle: StrictBool = True
    drop_last: StrictBool = False
    log_every_steps: StrictInt = Field(50, ge=0, description="log train/loss every N optimizer steps; 0 = per epoch only")
    progress_bar: StrictBool = True
    nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf training loss: stop the run (the last checkpoint kept), or skip that step")

    @property
    def resolved_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    @property
    def resolved_epochs(self) -> int:
        return 1 if self.fast_dev_run else self.epochs

    @property
    def resolved_limit_batches(self) -> int | None:
        return 1 if self.fast_dev_run else self.limit_batches


class CheckpointConfig(Section):
    """When checkpoints are taken and which are kept."""

    every_epochs: StrictInt = Field(1, ge=0, description="checkpoint every N epochs (and after the last); 0 = never")
    every_steps: StrictInt | None = Field(None, ge=1, description="also checkpoint every N optimizer steps mid-epoch")
    keep_last: StrictInt = Field(2, ge=0)
    keep_best: StrictInt = Field(1, ge=0)
    monitor: str = Field("eval/loss", description="metric that ranks checkpoints for keep_best")
    mode: Literal["min", "max"] = "min"
    background: StrictBool = Field(True, description="write checkpoints on a background thread while training goes "
                                   "on (one pending at most); false: training waits for each write")


#: The trackers accelerate can log to, by its names (``accelerate.utils.LoggerType`` without ``all``: a run logs
#: to the trackers its config names, not to whatever happens to be installed).
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


class TrackingConfig(Section):
    """Experiment trackers, through accelerate's: every record of ``metrics.jsonl`` is logged to each, from
    the main process, at its optimizer step. A tracker whose package is not installed is an error."""

    log_with: list[Literal[TRACKERS]] = Field(  # type: ignore[valid-type]
        default_factory=list, description=f"trackers to log to: {', '.join(TRACKERS)}")
    project: str = Field("phasetrain", min_length=1, description="the tracker's project (TensorBoard: a folder in "
                         "RUN_DIR/tracking; MLflow: the experiment)")
    run_name: str | None = Field(None, min_length=1, description="the run's name in the tracker; default: "
                                 "run_dir's folder name")
    init_kwargs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per tracker, keyword arguments for its start, e.g. {wandb: {entity: me}}")

    @field_validator("log_with", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("project")
    @classmethod
    def _a_name_not_a_path(cls, value: str) -> str:
        # TensorBoard writes to RUN_DIR/tracking/<project>: a path would write elsewhere.
        if "/" in value or "\\" in value or value in (".", ".."):
            raise ValueError(f"expected a name, not a path: {value!r} (TensorBoard writes to RUN_DIR/tracking/<project>)")
        return value

    @model_validator(mode="after")
    def _kwargs_for_named_trackers(self) -> TrackingConfig:
        unused = sorted(set(self.init_kwargs) - set(self.log_with))
        if unused:
            raise ValueError(f"init_kwargs for {', '.join(unused)}, which log_with does not name ({self.log_with})")
        return self


class RunConfig(Section):
    """Everything a run needs; written to ``RUN_DIR/config.yaml`` so the folder alone can repeat the run."""

    run_dir: pathlib.Path = Field(pathlib.Path("runs/run"), description="where config, metrics and weights go")
    seed: StrictInt = Field(0, description=f"0 .. {MAX_SEED}, what numpy's seeding accepts")
    overwrite: StrictBool = Field(False, description="replace a run_dir that already holds a run")
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
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("seed")
    @classmethod
    def _seed_numpy_accepts(cls, seed: int) -> int:
        # Refused here, not when set_seed fails after the run folder and the components are built.
        if not 0 <= seed <= MAX_SEED:
            raise PydanticCustomError("seed_range", "expected a whole number from 0 to {max} (2**32 - 1), the seeds "
                                      "numpy accepts", {"max": MAX_SEED})
        return seed

    @field_validator("run_dir", mode="before")
    @classmethod
    def _folder_name_as_written(cls, value: Any) -> Any:
        # YAML reads an unquoted `2024-01-01` as a date and `007` as the int 7. A date gives its text back:
        # YAML makes a date only of the exact form YYYY-MM-DD, which str() writes again (from_dict's copy
        # has made it, and any datetime, a str() before this runs). A number or a boolean may have been
        # written several ways (007, 7, 0o7; yes, true), so ask for quotes.
        if isinstance(value, datetime.date):
            return str(value)
        if isinstance(value, int | float):  # bool is an int
            raise PydanticCustomError(_LOST_TEXT, "a folder name must be a string, not the {kind} {value} (unquoted "
                                      'in YAML, 007 and 7 both read as 7): quote it, as in run_dir: "007"',
                                      {"kind": type(value).__name__, "value": str(value)})
        return value

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
            state = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
            raise ConfigError(f"config file {str(path)!r} {state}: expected a YAML or JSON run config")
        return cls.from_dict(read_config_file(path) or {}, overrides, source=str(path))

    def with_overrides(self, overrides: list[str]) -> RunConfig:
        """A copy with dotted ``key=value`` overrides applied and validated."""
        return RunConfig.from_dict(self.to_dict(), overrides, source="overrides")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- overrides: a path is taken as written -------------------------------------------------------
def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML scalars/lists/maps,
    except for path keys (``run_dir``), whose value is the text as written."""
    result = json.loads(json.dumps(data, default=_plain))  # deep copy of plain data
    given: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected 'dotted.key=value', e.g. 'train.epochs=3'")
        if key.strip() in given:  # as in a config file: a key given twice is a mistake, not "the last wins"
            raise ConfigError(f"override {item!r}: {key.strip()} is given twice; give it once")
        given.add(key.strip())
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _override_value(item, parts, raw)
    return result


def _plain(value: Any) -> Any:
    # A numpy or torch scalar (a sweep's np.int64 seed) keeps its number: as text it would be refused.
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return str(value)


def _override_value(item: str, key: list[str], raw: str) -> Any:
    if not raw.strip():
        return None
    if _is_path(key):  # as YAML, run_dir=007 would be the int 7 and run_dir=2024-01-01 a date
        return raw.strip()
    try:
        return load_yaml(raw)
    except DuplicateKey as exc:
        raise ConfigError(exc.located(f"override {item!r}")) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {one_line(exc)}") from None


def _is_path(key: Sequence[str]) -> bool:
    section = _section_at(key[:-1], RunConfig)
    field = section.model_fields.get(key[-1]) if section else None
    return field is not None and pathlib.Path in (field.annotation, *typing.get_args(field.annotation))


def describe_validation_error(exc: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    """Turn pydantic's error list into short lines: where, what was wrong, what is expected."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key{_did_you_mean(err['loc'], root or RunConfig)}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) or err["type"] in _NAMES_ITS_INPUT else f" (got {got!r})"
            lines.append(f"{loc}: {err['msg']}{shown}{_strict_hint(err['type'], got)}")
    head = f"{source}: invalid config" if len(lines) > 1 else f"{source}: invalid config:"
    return head + (" " + lines[0] if len(lines) == 1 else "".join(f"\n  {line}" for line in lines))


#: Error types whose message shows the value already.
_NAMES_ITS_INPUT = {"value_error", _LOST_TEXT}

#: By pydantic error type, what a quoted value must read as for "remove the quotes" to be the fix.
_STRICT_TYPES: dict[str, tuple[type, ...]] = {"int_type": (int,), "float_type": (int, float), "bool_type": (bool,)}


def _strict_hint(error_type: str, got: Any) -> str:
    """For a strict field given the wrong kind of value: why it is refused, and how to write it."""
    expected = _STRICT_TYPES.get(error_type)
    if expected is None:
        return ""
    if isinstance(got, bool) and error_type != "bool_type":
        return ": a boolean is not a number"
    if isinstance(got, str) and _reads_as(got, expected, bool_wanted=error_type == "bool_type"):
        return ": remove the quotes"
    return ": write true or false" if error_type == "bool_type" else ""


def _reads_as(text: str, expected: tuple[type, ...], bool_wanted: bool) -> bool:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(value, expected) and isinstance(value, bool) == bool_wanted


def _section_at(loc: Sequence[Any], root: type[BaseModel]) -> type[BaseModel] | None:
    """The section the keys ``loc`` lead to from ``root``; None where they lead into a plain value."""
    section: type[BaseModel] | None = root
    for part in loc:
        field = section.model_fields.get(str(part)) if section else None
        ann = field.annotation if field else None
        section = next((t for t in (ann, *getattr(ann, "__args__", ())) if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return section


def _did_you_mean(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    section = _section_at(loc[:-1], root)
    if section is None:
        return ""
    known = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f", did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known keys: {', '.join(known)})"


def _shadowed(module_name: str) -> str:
    """Why ``module_name`` may be missing although the working folder has it: an installed package of the same
    top-level name comes first on sys.path (pytorch-accelerated's wheel installs one named ``examples``)."""
    top = module_name.partition(".")[0]
    installed = sys.modules.get(top)
    origin = getattr(installed, "__file__", None) or next(iter(getattr(installed, "__path__", [])), None)
    local = pathlib.Path.cwd() / top
    if installed is None or origin is None or not local.is_dir() or pathlib.Path(origin).is_relative_to(local):
        return ""
    return (f" (the package {top!r} was imported from {pathlib.Path(origin).parent if origin.endswith('.py') else origin}, "
            f"installed by another distribution, not from ./{top}: rename ./{top} or uninstall that package)")


def ensure_importable_cwd() -> None:
    """Make ``examples.digits:...`` style targets importable when running from a project folder.

    Appended, not put first: a folder in the working directory named like an installed package (a
    ``torchmetrics/`` of notes, say) must not shadow that package; project modules are found all the same.
    """
    cwd = str(pathlib.Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)
