"""Configs that say something other than what they mean are refused with one readable message.

Each test here failed on the code before its fix: a seed numpy rejects only deep in training, a
duplicate key silently dropped, ``epochs: true`` read as 1, a date or ``007`` as a run folder, a
``torchmetrics/`` folder in the working directory shadowing the installed package, and the test
split evaluated twice at the end of ``examples/digits_test_phase.yaml``.
"""
from __future__ import annotations

import datetime
import json
import pathlib
import shutil
import subprocess
import sys
import typing
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from phasetrain import ConfigError, ImportSpec, RunConfig, Trainer
from tests.conftest import digits_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write(folder: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = folder / name
    path.write_text(text)
    return path


# ---- 1. seed range ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
def test_a_seed_numpy_cannot_take_is_refused_naming_the_range(seed: int) -> None:
    with pytest.raises(ConfigError, match=rf"seed: expected a whole number from 0 to 4294967295 .*\(got {seed}\)"):
        RunConfig.from_dict({"seed": seed})


def test_the_largest_allowed_seed_really_seeds_a_run(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run", seed=2**32 - 1))  # set_seed runs in the constructor
    assert trainer.config.seed == 2**32 - 1


# ---- 2. duplicate keys ------------------------------------------------------------------------------

DUPLICATE_LR = """\
seed: 0
loss: torch.nn:CrossEntropyLoss
optimizer:
  target: torch.optim:AdamW
  args:
    lr: 0.002
    lr: 0.02
"""


def test_a_duplicate_key_in_yaml_names_the_key_and_both_lines(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "config.yaml", DUPLICATE_LR)
    with pytest.raises(ConfigError) as info:
        RunConfig.from_file(path)
    assert str(info.value).startswith(f"{path} line 7: duplicate key 'lr' (first on line 6)")
    top = write(tmp_path, "top.yaml", "seed: 1\nrun_dir: runs/a\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"top.yaml line 3: duplicate key 'seed' \(first on line 1\)"):
        RunConfig.from_file(top)


def test_a_merge_key_may_still_be_overridden(tmp_path: pathlib.Path) -> None:
    # `<<:` copies keys that the mapping may then set again: that is YAML's override, not a duplicate.
    path = write(tmp_path, "config.yaml", "train:\n  <<: {epochs: 3, batch_size: 8}\n  epochs: 5\n")
    assert RunConfig.from_file(path).train.model_dump(include={"epochs", "batch_size"}) == {"epochs": 5, "batch_size": 8}


def test_a_duplicate_key_in_json_or_an_override_is_refused(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "config.json", json.dumps({"train": {"epochs": 2}})[:-1] + ', "train": {"epochs": 3}}')
    with pytest.raises(ConfigError, match=r"config.json: duplicate key 'train' \(in an object with keys: train\)"):
        RunConfig.from_file(path)
    with pytest.raises(ConfigError, match=r"override 'train=\{epochs: 1, epochs: 2\}' line 1: duplicate key 'epochs'"):
        RunConfig.from_dict({}, overrides=["train={epochs: 1, epochs: 2}"])


def test_the_cli_prints_a_duplicate_key_as_one_line(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "config.yaml", DUPLICATE_LR)
    result = subprocess.run([sys.executable, "-m", "phasetrain.cli", "run", str(path)], check=False,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    expected = (f"phasetrain: error: {path} line 7: duplicate key 'lr' (first on line 6): remove one of them "
                "(YAML would keep only the last)")
    assert result.stderr.splitlines() == [expected]


# ---- 3. strict numbers and booleans -----------------------------------------------------------------

def scalar_kind(annotation: Any) -> str | None:
    """'int', 'bool' or 'float' for a field of that type (optional or not), else None."""
    for arg in typing.get_args(annotation) or (annotation,):
        if typing.get_origin(arg) is typing.Annotated:
            arg = typing.get_args(arg)[0]
        for kind in (bool, int, float):  # bool first: it is a subclass of int
            if arg is kind:
                return kind.__name__
    return None


def scalar_fields() -> list[tuple[str, str]]:
    """(dotted key, kind) of every int, bool and float field of RunConfig and of its sections."""
    found = []
    for name, field in RunConfig.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += [(f"{name}.{sub}", kind) for sub, f in field.annotation.model_fields.items()
                      if (kind := scalar_kind(f.annotation))]
        elif kind := scalar_kind(field.annotation):
            found.append((name, kind))
    return found


def nested(dotted: str, value: Any) -> dict[str, Any]:
    *sections, key = dotted.split(".")
    data: dict[str, Any] = {key: value}
    for section in reversed(sections):
        data = {section: data}
    return data


#: What lax validation would silently read as something else, per field kind, and the line it gets.
WRONG = {
    "int": [(True, r"Input should be a valid integer \(got True\): a boolean is not a number"),
            ("3", r"Input should be a valid integer \(got '3'\): remove the quotes")],
    "bool": [(1, r"Input should be a valid boolean \(got 1\): write true or false"),
             ("true", r"Input should be a valid boolean \(got 'true'\): remove the quotes")],
    "float": [(True, r"Input should be a valid number \(got True\): a boolean is not a number"),
              ("0.5", r"Input should be a valid number \(got '0.5'\): remove the quotes")],
}


def test_the_field_list_covers_every_section() -> None:
    keys = dict(scalar_fields())
    assert {"seed": "int", "overwrite": "bool", "train.epochs": "int", "train.eval_batch_size": "int",
            "train.shuffle": "bool", "train.max_grad_norm": "float", "checkpoint.keep_last": "int"}.items() <= keys.items()


@pytest.mark.parametrize(("key", "value", "expected"), [
    pytest.param(key, value, expected, id=f"{key}={value!r}")
    for key, kind in scalar_fields() for value, expected in WRONG[kind]])
def test_a_number_or_boolean_of_the_wrong_kind_is_refused(key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match=rf"config: invalid config: {key}: {expected}$"):
        RunConfig.from_dict(nested(key, value))


def test_numpy_scalars_from_a_sweep_keep_their_kind() -> None:
    config = RunConfig.from_dict({"seed": np.int64(3), "overwrite": np.bool_(True), "train": {"max_grad_norm": np.float32(2)}})
    assert (config.seed, config.overwrite, config.train.max_grad_norm) == (3, True, 2.0)


def test_strict_fields_hold_for_assignments_and_floats_still_take_whole_numbers() -> None:
    config = RunConfig.from_dict({"train": {"max_grad_norm": 1}})
    assert config.train.max_grad_norm == 1.0 and isinstance(config.train.max_grad_norm, float)
    with pytest.raises(ConfigError, match=r"epochs: Input should be a valid integer \(got True\)"):
        config.train.epochs = True
    assert config.train.epochs == 10


# ---- 4. run_dir is a path, whatever it looks like ----------------------------------------------------

@pytest.mark.parametrize("folder", ["2024-01-01", "007", "1e3", "true", "2024-01-01 10:00:00"])
def test_a_run_dir_override_is_taken_as_written(folder: str) -> None:
    assert RunConfig.from_dict({}, overrides=[f"run_dir={folder}"]).run_dir == pathlib.Path(folder)


def test_a_yaml_date_is_the_folder_it_reads_as(tmp_path: pathlib.Path) -> None:
    # YAML reads only the exact form YYYY-MM-DD as a date, so its isoformat() is the text as written.
    path = write(tmp_path, "config.yaml", "run_dir: 2024-01-01\n")
    assert RunConfig.from_file(path).run_dir == pathlib.Path("2024-01-01")
    assert RunConfig(run_dir=datetime.date(2024, 1, 1)).run_dir == pathlib.Path("2024-01-01")


@pytest.mark.parametrize(("written", "read_as"), [
    ("007", "the int 7"), ("1.10", "the float 1.1"), ("yes", "the bool True")])
def test_a_yaml_run_dir_that_lost_its_text_asks_for_quotes(tmp_path: pathlib.Path, written: str, read_as: str) -> None:
    path = write(tmp_path, "config.yaml", f"run_dir: {written}\n")
    with pytest.raises(ConfigError, match=rf"run_dir: a folder name must be a string, not {read_as} \(unquoted in "
                                          r"YAML, 007 and 7 both read as 7\): quote it, as in run_dir: \"007\"$"):
        RunConfig.from_file(path)


# ---- 5. the working directory is importable, after the installed packages ---------------------------

@pytest.mark.parametrize("command", [[str(pathlib.Path(sys.executable).with_name("phasetrain"))],
                                     [sys.executable, "-m", "phasetrain"]], ids=["console-script", "python-m"])
def test_the_working_directory_adds_modules_but_shadows_no_installed_package(tmp_path: pathlib.Path,
                                                                             command: list[str]) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "torchmetrics").mkdir()
    write(tmp_path / "torchmetrics", "__init__.py", "raise ImportError('the working directory shadowed torchmetrics')\n")
    config = digits_config(tmp_path / "run", train={"epochs": 1}).to_dict()  # examples.digits and torchmetrics targets
    write(tmp_path, "config.yaml", json.dumps(config))
    # `python -m` puts the working folder first on sys.path by itself: phasetrain's __main__ takes it off.
    result = subprocess.run([*command, "run", "config.yaml"], check=False, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()


# ---- 6. examples/digits_test_phase.yaml evaluates the test set once per test -------------------------

def test_the_test_phase_example_evaluates_the_test_set_once_per_evaluation(tmp_path: pathlib.Path) -> None:
    # 4 epochs keep the example's every-2 rhythm: a mid-run test after epoch 2, and epoch 4 is the last.
    config = RunConfig.from_file(ROOT / "examples/digits_test_phase.yaml", overrides=[
        f"run_dir={tmp_path / 'run'}", "train.epochs=4", "train.progress_bar=false"])
    Trainer(config).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tests = [(r["phase"], r["epoch"], r["step"]) for r in records if any(key.startswith("test/") for key in r)]
    assert [(phase, epoch) for phase, epoch, _ in tests] == [("test", 2), ("done", 4)]
    assert len({(epoch, step) for _, epoch, step in tests}) == len(tests)


def test_an_installed_package_that_shadows_a_project_folder_is_named(tmp_path: pathlib.Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # pytorch-accelerated's wheel installs a top-level `examples` package: a project's examples/ then fails to
    # import although it is right there in the working folder.
    for folder in (tmp_path / "site" / "shadowed_examples", tmp_path / "project" / "shadowed_examples"):
        folder.mkdir(parents=True)
    write(tmp_path / "site" / "shadowed_examples", "__init__.py", "")
    write(tmp_path / "project" / "shadowed_examples", "models.py", "def make(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.delitem(sys.modules, "shadowed_examples", raising=False)
    with pytest.raises(ConfigError) as raised:
        ImportSpec(target="shadowed_examples.models:make").resolve()
    assert str(raised.value) == (
        "cannot import module 'shadowed_examples.models' of target 'shadowed_examples.models:make': No module named "
        f"'shadowed_examples.models' (the package 'shadowed_examples' was imported from {tmp_path}/site/"
        "shadowed_examples, installed by another distribution, not from ./shadowed_examples: rename "
        "./shadowed_examples or uninstall that package)")
