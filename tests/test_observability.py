"""Seeing a run: trackers through accelerate, timing records, the console's times, plot and report."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

from phasetrain import Callback, Trainer
from phasetrain.config import TRACKERS
from phasetrain.tracking import RATES
from tests.conftest import ROOT, digits_config, records_without_times, subprocess_env

TENSORBOARD = {"tracking": {"log_with": ["tensorboard"]}}


class Crash(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.state.optimizer_step == self.step:
            raise Crash


def records(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run, read with tensorboard's own reader (which applies the
    purge a resumed run's writer asks for)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tracking" / "phasetrain"))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def quiet_run(trainer: Trainer, **kwargs: Any) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        trainer.run(**kwargs)
    return out.getvalue()


# ---- trackers --------------------------------------------------------------------------------------
def test_tensorboard_gets_every_record_of_metrics_jsonl_at_its_optimizer_step(tmp_path: pathlib.Path) -> None:
    Trainer(digits_config(tmp_path / "run", train={"epochs": 2, "log_every_steps": 10}, **TENSORBOARD)).run()
    shown, written = scalars(tmp_path / "run"), records(tmp_path / "run")
    for record in written:
        if record["kind"] == "phase":
            expected = {f"phase_seconds/{record['phase']}": record["time"]["seconds"]}
        else:
            prefix = "step/" if record["kind"] == "step" else ""
            expected = {f"{prefix}{k}": v for k, v in record.items() if "/" in k}
            expected |= {f"{prefix}time/{k}": v for k, v in record.get("time", {}).items() if k in RATES}
        for tag, value in expected.items():
            assert (record["step"], pytest.approx(value, rel=1e-6)) in shown[tag], (tag, record)
    epoch_points = sum(1 for r in written if r["kind"] == "epoch" for k in r if "/" in k)
    assert sum(len(v) for k, v in shown.items() if not k.startswith(("step/", "time/", "phase_seconds/"))) == epoch_points
    assert [step for step, _ in shown["eval/loss"]] == [40, 80]
    assert [step for step, _ in shown["step/train/loss"]] == list(range(10, 81, 10))


def test_a_resumed_run_continues_the_tensorboard_run_without_duplicate_points(tmp_path: pathlib.Path) -> None:
    # Step records every 5 steps, checkpoints every 10: the crash at 17 leaves points at 15 logged after the
    # step-10 checkpoint, and the checkpoint's own step-10 point must survive the purge of what followed it.
    sections = {"train": {"epochs": 2, "log_every_steps": 5},
                "checkpoint": {"every_epochs": 0, "every_steps": 10, "keep_last": 1}, **TENSORBOARD}
    Trainer(digits_config(tmp_path / "a", **sections)).run()
    config = digits_config(tmp_path / "b", **sections)
    with pytest.raises(Crash):
        Trainer(config, callbacks=[CrashAt(step=17)]).run()
    at_15 = next(r for r in records(tmp_path / "a") if r["kind"] == "step" and r["step"] == 15)
    assert (15, pytest.approx(at_15["train/loss"])) in scalars(tmp_path / "b")["step/train/loss"]
    Trainer(config).run(resume="latest")
    assert_same_points(tmp_path / "b", tmp_path / "a")
    assert records_without_times(tmp_path / "b") == records_without_times(tmp_path / "a")


def assert_same_points(run_dir: pathlib.Path, reference: pathlib.Path) -> None:
    """TensorBoard shows ``run_dir`` with every point of ``reference``, none missing, none twice, at the same
    steps, with the same values where they are not times."""
    resumed, uninterrupted = scalars(run_dir), scalars(reference)
    assert resumed.keys() == uninterrupted.keys()
    for tag, points in uninterrupted.items():
        assert [step for step, _ in resumed[tag]] == [step for step, _ in points], tag
        if not tag.startswith(("time/", "step/time/", "phase_seconds/")):
            assert [value for _, value in resumed[tag]] == [value for _, value in points], tag


def test_a_tracker_whose_package_is_missing_is_one_line_naming_it(tmp_path: pathlib.Path) -> None:
    missing = next((name for name in ("aim", "clearml", "swanlab", "dvclive", "trackio", "wandb")
                    if importlib.util.find_spec(name) is None), None)
    if missing is None:
        pytest.skip("every tracker package is installed here")
    result = subprocess.run([sys.executable, "-m", "phasetrain", "run", "examples/digits.yaml",
                             f"run_dir={tmp_path / 'run'}", f"tracking.log_with=[{missing}]"],
                            capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=120,
                            check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"'{missing}'" in lines[0] and "pip install" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_the_tracker_names_are_accelerates() -> None:
    from accelerate.utils import LoggerType
    assert set(TRACKERS) == {str(name) for name in LoggerType} - {"all"}


def test_fast_dev_run_logs_to_no_tracker(tmp_path: pathlib.Path) -> None:
    Trainer(digits_config(tmp_path / "run", train={"fast_dev_run": True}, **TENSORBOARD)).run()
    assert not (tmp_path / "run").exists()


# ---- timing records --------------------------------------------------------------------------------
def test_phase_records_cover_every_visit_and_sum_to_the_runs_wall_time(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 4}, checkpoint={"every_epochs": 2}))
    start = time.perf_counter()
    quiet_run(trainer)
    wall = time.perf_counter() - start
    visits = [r for r in records(tmp_path / "run") if r["kind"] == "phase"]
    assert [(r["phase"], r["epoch"]) for r in visits] == [
        ("setup", 0), ("train_epoch", 1), ("eval_epoch", 1), ("train_epoch", 2), ("eval_epoch", 2), ("checkpoint", 2),
        ("train_epoch", 3), ("eval_epoch", 3), ("train_epoch", 4), ("eval_epoch", 4), ("checkpoint", 4), ("done", 4)]
    for earlier, later in itertools.pairwise(visits):  # one after the other, never overlapping
        assert later["time"]["start"] >= earlier["time"]["start"] + earlier["time"]["seconds"] - 1e-3
    total = sum(r["time"]["seconds"] for r in visits)
    assert 0.95 * wall <= total <= wall, (total, wall)


def test_train_records_carry_throughput_and_step_time(tmp_path: pathlib.Path) -> None:
    quiet_run(Trainer(digits_config(tmp_path / "run", train={"epochs": 2, "log_every_steps": 8})))
    written = records(tmp_path / "run")
    train = [r for r in written if r["kind"] == "epoch" and r["phase"] == "train_epoch"]
    steps = [r for r in written if r["kind"] == "step"]
    assert len(train) == 2 and len(steps) == 10
    for record in train + steps:
        rates = record["time"]
        assert rates["steps_per_s"] == pytest.approx(1 / rates["step_s"], rel=1e-3)
        # An epoch: the whole train split. A step record: 8 steps of 32 samples, the epoch's last one of 11.
        samples = 1259 if record["kind"] == "epoch" else 7 * 32 + 11 if record["step"] % 40 == 0 else 8 * 32
        assert rates["samples_per_s"] == pytest.approx(samples / rates["seconds"], rel=1e-3)
    phase_seconds = [r["time"]["seconds"] for r in written if r["kind"] == "phase" and r["phase"] == "train_epoch"]
    for record, visit in zip(train, phase_seconds, strict=True):
        assert 0.8 * visit <= record["time"]["seconds"] <= visit


def test_the_time_per_phase_of_a_resumed_run_covers_the_whole_run(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", checkpoint={"every_epochs": 1})
    with pytest.raises(Crash):
        quiet_run(Trainer(config, callbacks=[CrashAt(step=45)]))
    output = quiet_run(Trainer(config), resume="latest")
    summary = next(line for line in output.splitlines() if line.startswith("time per phase: "))
    assert "setup " in summary  # setup ran before the crash only
    assert "eval_epoch " in summary and "checkpoint " in summary


def test_a_resume_may_start_logging_to_a_tracker_which_gets_the_runs_earlier_records_too(
        tmp_path: pathlib.Path) -> None:
    sections = {"train": {"epochs": 2, "log_every_steps": 10}, "checkpoint": {"every_epochs": 1}}
    quiet_run(Trainer(digits_config(tmp_path / "a", **sections, **TENSORBOARD)))
    config = digits_config(tmp_path / "run", **sections)
    with pytest.raises(Crash):
        quiet_run(Trainer(config, callbacks=[CrashAt(step=45)]))
    with pytest.warns(UserWarning, match="resuming with config changes, applied from here on: tracking") as caught:
        quiet_run(Trainer(config.with_overrides(["tracking.log_with=[tensorboard]"])), resume="latest")
    assert "bitwise" not in str(caught[0].message)  # trackers change no result
    assert_same_points(tmp_path / "run", tmp_path / "a")


def test_a_resume_may_stop_logging_to_a_tracker_without_a_word_about_it(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", checkpoint={"every_epochs": 1}, **TENSORBOARD)
    with pytest.raises(Crash):
        quiet_run(Trainer(config, callbacks=[CrashAt(step=45)]))
    with pytest.warns(UserWarning) as caught:
        quiet_run(Trainer(config.with_overrides(["tracking.log_with=[]"])), resume="latest")
    assert [str(w.message).split(":")[0] for w in caught] == ["resuming with config changes, applied from here on"]


def test_a_checkpoint_of_another_run_folder_starts_new_tracker_runs(tmp_path: pathlib.Path) -> None:
    # The checkpoint's tracker state (run ids, the points of its last step) belongs to the other folder's runs:
    # the new folder's trackers get the checkpoint's records, as a resume that starts tracking does.
    config = digits_config(tmp_path / "a", checkpoint={"every_epochs": 1}, **TENSORBOARD)
    quiet_run(Trainer(config.with_overrides([f"run_dir={tmp_path / 'reference'}"])))
    with pytest.raises(Crash):
        quiet_run(Trainer(config, callbacks=[CrashAt(step=45)]))
    checkpoint = next((tmp_path / "a" / "checkpoints").glob("epoch001*"))
    other = Trainer(config.with_overrides([f"run_dir={tmp_path / 'b'}"]))
    with pytest.warns(UserWarning, match="metrics.jsonl was missing: rebuilt from the checkpoint"):
        quiet_run(other, resume=str(checkpoint), from_other_run=True)
    assert_same_points(tmp_path / "b", tmp_path / "reference")


def test_the_console_shows_each_epochs_rate_and_phase_times_and_where_the_time_went(tmp_path: pathlib.Path) -> None:
    output = quiet_run(Trainer(digits_config(tmp_path / "run", checkpoint={"every_epochs": 1})))
    epoch_lines = [line for line in output.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2, output
    for line in epoch_lines:
        assert "train/loss" in line and "eval/accuracy" in line and "samples/s" in line
        assert all(f"{phase} " in line.split("|")[1] for phase in ("train_epoch", "eval_epoch", "checkpoint"))
    summary = next(line for line in output.splitlines() if line.startswith("time per phase: "))
    shares = [int(part.split("%")[0].rsplit(" ", 1)[1]) for part in summary.split(", ")]
    assert summary.startswith("time per phase: train_epoch ") and 97 <= sum(shares) <= 103, summary


# ---- plot ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("observed") / "run"
    config = digits_config(run_dir, train={"epochs": 3, "log_every_steps": 10},
                           checkpoint={"every_epochs": 1, "keep_last": 3, "keep_best": 1, "monitor": "eval/accuracy",
                                       "mode": "max"})
    quiet_run(Trainer(config))
    return run_dir


def test_plot_draws_the_curves_on_shared_axes_and_the_timeline(finished_run: pathlib.Path,
                                                               tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from phasetrain.plot import plot_run
    figure = plot_run(finished_run, tmp_path / "curves.png")
    axes = figure.get_axes()
    assert [ax.get_ylabel() for ax in axes[:-1]] == ["loss", "accuracy", "lr", "samples/s"]
    assert [line.get_label() for line in axes[0].get_lines()] == ["train/loss (steps)", "train/loss", "eval/loss",
                                                                 "test/loss"]
    assert [tick.get_text() for tick in axes[-1].get_yticklabels()] == ["setup", "train_epoch", "eval_epoch",
                                                                        "checkpoint", "done"]
    image = imread(tmp_path / "curves.png")
    assert image.shape[1] > 800 and image.shape[0] > 1200
    assert image[..., :3].std() > 0.1  # not blank

    figure = plot_run(finished_run, tmp_path / "two.png", ["eval/loss", "eval/accuracy"])
    assert [ax.get_ylabel() for ax in figure.get_axes()[:-1]] == ["loss", "accuracy"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phasetrain", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or subprocess_env(), timeout=120, check=False)


def test_plot_without_matplotlib_says_how_to_install_it(finished_run: pathlib.Path, tmp_path: pathlib.Path) -> None:
    hidden = tmp_path / "hide"
    (hidden / "matplotlib").mkdir(parents=True)
    (hidden / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hidden), env.get("PYTHONPATH", "")])
    result = run_cli("plot", str(finished_run), "-o", str(tmp_path / "c.png"), env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "pip install 'phasetrain[plot]'" in result.stderr
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["plot", "{tmp}/nothing"], "is not a folder"),
    (["report", "{tmp}"], "is not a run folder"),
    (["plot", "{run}", "--metrics", "eval/accuracy,eval/los"], "no metric eval/los in the run's records (did you mean"),
    (["report", "{run}", "-o", "{tmp}/no/report.html"], "folder {tmp}/no does not exist"),
    (["report", "{run}", "-o", "{tmp}"], "-o {tmp} is a folder: give a file name"),
    (["plot", "{run}", "-o", "{tmp}/curves.txt"], "the file name must end in .png, .svg, .pdf"),
    (["plot", "{tmp}"], "is not a run folder (it has no config.yaml or metrics.jsonl)"),
])
def test_bad_plot_and_report_input_is_one_line(finished_run: pathlib.Path, tmp_path: pathlib.Path, args: list[str],
                                               message: str) -> None:
    result = run_cli(*[arg.format(tmp=tmp_path, run=finished_run) for arg in args])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message.format(tmp=tmp_path) in result.stderr


def test_a_run_that_logged_nothing_yet_has_a_report_and_no_plot(finished_run: pathlib.Path,
                                                                 tmp_path: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(finished_run / "config.yaml", run_dir)  # claimed, killed before its setup ended
    result = run_cli("plot", str(run_dir))
    assert result.returncode == 2 and "has no records yet (no phase has ended): nothing to plot" in result.stderr
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    page = (run_dir / "report.html").read_text()
    assert "No epoch has ended yet." in page and "No phase has ended yet." in page


def run_with_metrics(finished_run: pathlib.Path, folder: pathlib.Path, lines: list[str]) -> pathlib.Path:
    """A run folder with ``finished_run``'s config and these metrics.jsonl lines."""
    folder.mkdir()
    shutil.copy(finished_run / "config.yaml", folder)
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "line 2: not JSON"),
    ('{"phase": "train_epoch", "epoch": 1, "step": 40, "kind": "epoch", "time": null}', "('time' is None)"),
    ('{"phase": "train_epoch", "epoch": 1, "step": null, "kind": "epoch"}', "('step' is None)"),
    ('{"phase": "setup", "epoch": 0, "step": 0, "kind": "phase", "time": {"seconds": 1.0}}',
     "(a phase record's time needs 'start' and 'seconds')"),
    ("[1, 2]", "(a list, not an object)"),
])
def test_a_damaged_metrics_file_is_one_line_naming_the_line(finished_run: pathlib.Path, tmp_path: pathlib.Path,
                                                            line: str, message: str) -> None:
    good = (finished_run / "metrics.jsonl").read_text().splitlines()
    run_dir = run_with_metrics(finished_run, tmp_path / "run", [good[0], line, *good[1:]])
    for command in ("plot", "report"):
        result = run_cli(command, str(run_dir))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr and "metrics.jsonl, line 2: not " in result.stderr


def test_a_last_value_that_is_not_finite_is_shown_as_such(finished_run: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # metrics.jsonl writes NaN as null: the last eval/loss was NaN. The final table must not show an older value.
    lines = (finished_run / "metrics.jsonl").read_text().splitlines()
    last_eval = max(i for i, line in enumerate(lines) if '"eval/loss"' in line)
    record = json.loads(lines[last_eval])
    lines[last_eval] = json.dumps({**record, "eval/loss": None})
    run_dir = run_with_metrics(finished_run, tmp_path / "run", lines)
    from phasetrain.report import report_html
    page = report_html(run_dir)
    final = page.split('<section id="final-metrics">')[1].split("</section>")[0]
    assert "<td>eval/loss</td><td class=\"number\">not finite (NaN or infinity)</td>" in final
    assert f"eval/loss at step {record['step']}: not finite" in page  # marked on its curve
    if importlib.util.find_spec("matplotlib") is not None:
        from phasetrain.plot import plot_run
        figure = plot_run(run_dir, tmp_path / "curves.png")
        crosses = [line for line in figure.get_axes()[0].get_lines() if line.get_marker() == "x"]
        assert [list(line.get_xdata()) for line in crosses] == [[record["step"]]]


def test_the_tracking_project_is_a_name_not_a_path(tmp_path: pathlib.Path) -> None:
    from phasetrain import ConfigError
    with pytest.raises(ConfigError, match="tracking.project: .*expected a name, not a path: '../x'"):
        digits_config(tmp_path / "run", tracking={"project": "../x"})


# ---- report ----------------------------------------------------------------------------------------
SECTIONS = ("final-metrics", "curves", "where-the-time-went", "phase-graph", "checkpoints", "config")


def test_the_report_is_one_self_contained_page(finished_run: pathlib.Path, tmp_path: pathlib.Path) -> None:
    result = run_cli("report", str(finished_run), "-o", str(tmp_path / "report.html"))
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "report.html").read_text()
    for forbidden in ("<script", "<link", "src=", "url(", "https://"):  # nothing to fetch, nothing to run
        assert forbidden not in page
    assert all(f'<section id="{section}">' in page for section in SECTIONS)
    best = next(line for line in page.split("<tr") if "best by eval/accuracy (max)" in line)
    kept = sorted(p.name for p in (finished_run / "checkpoints").glob("epoch*"))
    accuracies = [json.loads((finished_run / "checkpoints" / name / "state.json").read_text())["monitor"] for name in kept]
    assert len(set(accuracies)) == 3  # the best by max is not the best by min
    assert kept[accuracies.index(max(accuracies))] in best
    final = [r for r in records(finished_run) if r["kind"] == "epoch"][-1]
    assert f"{final['test/accuracy']:.6g}" in page


def test_the_reports_graph_highlights_the_phase_the_run_stopped_in(tmp_path: pathlib.Path) -> None:
    if shutil.which("dot") is None:
        pytest.skip("no Graphviz here (.ci/run installs it)")
    from phasetrain.report import report_html
    config = digits_config(tmp_path / "run", train={"epochs": 2},
                           checkpoint={"every_epochs": 0, "every_steps": 10, "keep_last": 1})
    with pytest.raises(Crash):
        quiet_run(Trainer(config, callbacks=[CrashAt(step=12)]))
    graph = report_html(tmp_path / "run").split('<section id="phase-graph">')[1].split("</section>")[0]
    assert "Highlighted: <b>train_epoch</b>, the phase of the run's latest checkpoint" in graph
    assert "The last phase that ended: setup of epoch 0." in graph
    node = graph.split("<title>train_epoch</title>")[1].split("</g>")[0]  # Graphviz's group for the node
    assert 'fill="#ffcc80"' in node and graph.count('fill="#ffcc80"') == 1


def chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None and os.environ.get("PHASETRAIN_REQUIRE_CHROMIUM"):
        pytest.fail("Chromium is required here (PHASETRAIN_REQUIRE_CHROMIUM) but not installed")
    return found


def test_the_report_renders_in_headless_chromium(finished_run: pathlib.Path, tmp_path: pathlib.Path) -> None:
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium here (.ci/run installs it)")
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread
    page = tmp_path / "report.html"
    assert run_cli("report", str(finished_run), "-o", str(page)).returncode == 0
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path}/c"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1100,3200", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    for section in SECTIONS:  # what the browser built from the page
        assert f'<section id="{section}">' in dom
    assert dom.count("<svg") >= 6  # four panels of curves, the timeline, the graph
    image = imread(shot)[..., :3]
    assert image.shape[:2] == (3200, 1100)
    top, rows = image[:400], image.reshape(-1, 1100 * 3)
    assert top.std() > 0.05  # the heading and the first table are drawn
    assert (rows.std(axis=1) > 0.01).mean() > 0.3  # a third of the page's rows hold something: not blank


KILLED_AFTER_A_CHECKPOINT = """
import os, sys
from phasetrain import Callback, Trainer
from tests.conftest import digits_config

class CheckpointThenDie(Callback):
    # A checkpoint at step 12, two steps after the step-10 record, then death without any cleanup (as by
    # SIGKILL): the step-10 values wait to be sent until step 12's; only the checkpoint sends them.
    def on_train_step_end(self, trainer, loss):
        if trainer.state.optimizer_step == 12:
            trainer.save_checkpoint(wait=True)  # on disk before the death below
        if trainer.state.optimizer_step == 13:
            os._exit(9)

config = digits_config(sys.argv[1], train={"epochs": 1, "log_every_steps": 10}, tracking={"log_with": ["tensorboard"]})
Trainer(config, callbacks=[CheckpointThenDie()]).run()
"""


def test_values_logged_before_a_checkpoint_reach_the_tracker_after_a_kill(tmp_path: pathlib.Path) -> None:
    sections = {"train": {"epochs": 1, "log_every_steps": 10}, **TENSORBOARD}
    Trainer(digits_config(tmp_path / "a", **sections)).run()
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_A_CHECKPOINT, str(tmp_path / "b")], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == 9, killed.stderr
    Trainer(digits_config(tmp_path / "b", **sections)).run(resume="latest")
    assert scalars(tmp_path / "b")["step/train/loss"] == scalars(tmp_path / "a")["step/train/loss"]
