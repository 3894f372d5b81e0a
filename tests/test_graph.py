"""The phase graph as an object: custom phases, conditions, validation, rendering, plan and diagrams."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from phasetrain import (
    Callback,
    CallbackError,
    GraphError,
    Phase,
    RunConfig,
    TestPhase,
    Trainer,
    every_n_epochs,
    every_n_steps,
    on_last_epoch,
)
from phasetrain.graph import Edge, PhaseGraph, default_graph
from phasetrain.machine import PhaseMachine
from phasetrain.plan import plan
from phasetrain.render import edge_label
from tests.conftest import PhaseRecorder, ResumePoint, digits, digits_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Recorder(PhaseRecorder):
    def on_enter_test(self, trainer: Trainer) -> None:
        self._enter(f"test:{trainer.state.epoch}")

    def on_enter_snapshot(self, trainer: Trainer) -> None:
        self._enter(f"snapshot:{trainer.state.epoch}")


class Snapshot(Phase):
    """A custom phase that only records that it ran."""

    name = "snapshot"

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def run(self, trainer: Trainer) -> None:
        self.epochs.append(trainer.state.epoch)


def test_custom_phases_with_composed_conditions_visit_exactly_these_phases(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 6, "eval_every": 2}, checkpoint={"every_epochs": 3})
    trainer = Trainer(config)
    assert trainer.data.steps_per_epoch == 40
    trainer.add_phase(TestPhase(), after="eval_epoch", when=every_n_epochs(2) & ~on_last_epoch())
    trainer.add_phase(Snapshot(), after="train_epoch", when=every_n_steps(100) | on_last_epoch())
    recorder = Recorder()
    trainer.add_callback(recorder)
    planned = [name for epoch in plan(trainer.machine, 6, 40) for name, _ in epoch.phases]
    history = trainer.run()
    # Steps 100 and 200 are crossed in epochs 3 and 5; the test phase follows evaluations except the last.
    assert recorder.visited == [
        "setup",
        "train_epoch:1", "train_epoch:2", "eval_epoch:2", "test:2",
        "train_epoch:3", "snapshot:3", "checkpoint:3",
        "train_epoch:4", "eval_epoch:4", "test:4",
        "train_epoch:5", "snapshot:5",
        "train_epoch:6", "snapshot:6", "eval_epoch:6", "checkpoint:6", "done",
    ]
    assert planned == [v.split(":")[0] for v in recorder.visited]  # the plan foresaw the walk exactly
    assert len(history.get_metric_values("test/accuracy")) == 3  # epochs 2, 4 and the final test in done


def test_a_custom_phase_can_stop_the_run(tmp_path: pathlib.Path) -> None:
    class StopWhenGood(Phase):
        name = "judge"

        def run(self, trainer: Trainer) -> None:
            if trainer.run_history.get_latest_metric("eval/accuracy") > 0.5:
                trainer.request_stop("good enough")

    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 10}))
    trainer.add_phase(StopWhenGood(), after="eval_epoch")
    recorder = PhaseRecorder()
    trainer.add_callback(recorder)
    trainer.run()
    assert trainer.state.stop_reason == "good enough"
    assert recorder.visited[-1] == "done" and trainer.state.epoch < 10


class Noisy(Phase):
    """A custom phase that consumes RNG (like a stochastic evaluation), checkpoints at its start, and
    crashes once after its work: a resume must re-run it from the start and land bit for bit."""

    name = "noisy"

    def __init__(self, crash_once: bool) -> None:
        self.crash_once = crash_once

    def run(self, trainer: Trainer) -> None:
        trainer.save_checkpoint()
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)  # perturb the weights with global-RNG noise
        if self.crash_once:
            self.crash_once = False
            raise RuntimeError("crash inside the custom phase")


def test_resume_from_inside_a_custom_phase_is_bitwise_exact(tmp_path: pathlib.Path) -> None:
    def trainer_for(name: str, crash: bool) -> Trainer:
        config = digits_config(tmp_path / name, train={"epochs": 3}, checkpoint={"every_epochs": 1, "keep_last": 9})
        trainer = Trainer(config)
        trainer.add_phase(Noisy(crash), after="train_epoch", when=every_n_epochs(2))
        return trainer

    reference = trainer_for("a", crash=False)
    reference.run()
    with pytest.raises(RuntimeError, match="crash inside the custom phase"):
        trainer_for("b", crash=True).run()
    torch.manual_seed(999)
    resumed = trainer_for("b", crash=False)
    point = ResumePoint()
    resumed.add_callback(point)
    resumed.run(resume="latest")
    assert point.at == ("noisy", 2, 80, True)  # saved at the start of the phase: it runs again from there
    for a, b in zip(reference.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resuming_into_a_phase_the_graph_lacks_is_refused(tmp_path: pathlib.Path) -> None:
    config = digits_config(tmp_path / "run", train={"epochs": 3}, checkpoint={"every_epochs": 1})
    with_phase = Trainer(config)
    with_phase.add_phase(Noisy(crash_once=True), after="train_epoch", when=every_n_epochs(2))
    with pytest.raises(RuntimeError):
        with_phase.run()
    with pytest.raises(GraphError, match="phase 'noisy' is not in this run's graph; phases: setup, train_epoch"):
        Trainer(config).run(resume="latest")


# ---- validation -------------------------------------------------------------------------------------

def test_add_phase_after_an_unknown_phase_lists_the_phases(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run"))
    with pytest.raises(GraphError, match="after='eval' names no phase; phases: setup, train_epoch, eval_epoch, "
                                         "checkpoint, done"):
        trainer.add_phase(Snapshot(), after="eval")


def test_callback_on_an_unknown_phase_lists_the_phases(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run"), callbacks=[Recorder()])
    with pytest.raises(CallbackError, match=r"Recorder defines on_enter_snapshot, on_enter_test, which match no "
                                            r"hook. Phase hooks are on_enter_<phase>/on_exit_<phase> for the "
                                            r"phases setup, train_epoch, eval_epoch, checkpoint, done"):
        trainer.run()
    # Valid once the phases exist: given to the constructor, or with add_callback, before add_phase or after.
    recorder = Recorder()
    trainer = Trainer(digits_config(tmp_path / "run2", train={"epochs": 1}), callbacks=[recorder])
    trainer.add_phase(TestPhase(), after="eval_epoch")
    trainer.add_phase(Snapshot(), after="train_epoch")
    trainer.run()
    assert "snapshot:1" in recorder.visited and "test:1" in recorder.visited


class Node(Phase):
    def __init__(self, name: str) -> None:
        self.name = name


def graph_of(names: list[str], edges: list[Edge]) -> PhaseGraph:
    return PhaseGraph([Node(name) for name in names], edges)


def test_invalid_graphs_are_refused_with_the_phases_named() -> None:
    graph = default_graph()
    with pytest.raises(GraphError, match=r"cycle eval_epoch -> again -> eval_epoch never passes train_epoch"):
        graph.add_phase(Node("again"), after="eval_epoch", when=every_n_epochs(2), then="eval_epoch")
    with pytest.raises(GraphError, match="phases not reachable from setup: orphan"):
        graph_of(["setup", "train_epoch", "orphan", "done"], [
            Edge("setup", "train_epoch"), Edge("train_epoch", "done"), Edge("orphan", "done")]).validate()
    with pytest.raises(GraphError, match="done cannot be reached from: train_epoch, spin"):
        graph_of(["setup", "train_epoch", "spin", "done"], [
            Edge("setup", "train_epoch", on_last_epoch()), Edge("setup", "done"), Edge("train_epoch", "spin"),
            Edge("spin", "train_epoch")]).validate()
    # An unconditional edge shadows the edges after it: here train_epoch's own edges are never taken.
    with pytest.raises(GraphError, match="phases not reachable from setup: eval_epoch, checkpoint$"):
        default_graph().add_phase(Node("loop"), after="train_epoch", then="train_epoch")
    with pytest.raises(GraphError, match="then='setup': setup runs once"):
        default_graph().add_phase(Node("again"), after="eval_epoch", then="setup")
    with pytest.raises(GraphError, match="no unconditional way out .*: train_epoch"):
        graph_of(["setup", "train_epoch", "done"], [
            Edge("setup", "train_epoch"), Edge("train_epoch", "done", on_last_epoch())]).validate()
    with pytest.raises(GraphError, match="a phase named 'checkpoint' already exists.*use replace_phase"):
        default_graph().add_phase(Node("checkpoint"), after="eval_epoch")
    with pytest.raises(GraphError, match="after='done': done is final"):
        default_graph().add_phase(Node("late"), after="done")
    with pytest.raises(GraphError, match="must be lowercase letters"):
        default_graph().add_phase(Node("Test Set"), after="eval_epoch")
    with pytest.raises(GraphError, match="replace_phase: no phase named 'evaluate' to replace; phases: setup"):
        default_graph().replace_phase(Node("evaluate"))


def test_a_phase_sent_back_to_train_epoch_still_lets_the_run_finish() -> None:
    graph = default_graph(checkpoint_every=0)
    graph.add_phase(Node("again"), after="eval_epoch", when=every_n_epochs(1), then="train_epoch")
    walk = [[name for name, _ in epoch.phases] for epoch in plan(PhaseMachine(graph), 2, 10)]
    assert walk[1:] == [["train_epoch", "eval_epoch", "again"], ["train_epoch", "eval_epoch", "again", "done"]]


def test_a_walk_into_train_epoch_after_the_last_epoch_is_stopped() -> None:
    # Valid as a graph (every phase reaches done), but eval_epoch goes back to train_epoch unconditionally.
    graph = graph_of(["setup", "train_epoch", "eval_epoch", "done"], [
        Edge("setup", "train_epoch"), Edge("train_epoch", "eval_epoch", every_n_epochs(1)),
        Edge("train_epoch", "done"), Edge("eval_epoch", "train_epoch")])
    with pytest.raises(GraphError, match="entered train_epoch from eval_epoch after the last epoch \\(epoch 2 of 2\\)"):
        plan(PhaseMachine(graph), 2, 10)


def test_phases_added_after_the_same_phase_keep_their_order_also_with_then() -> None:
    graph = default_graph(checkpoint_every=0)
    graph.add_phase(Node("first"), after="eval_epoch", when=every_n_epochs(2), then="train_epoch")
    graph.add_phase(Node("second"), after="eval_epoch", when=every_n_epochs(1))
    assert [e.dest for e in graph.edges_from("eval_epoch")][:2] == ["first", "second"]


def test_a_refused_phase_leaves_the_graph_unchanged() -> None:
    graph = default_graph()
    before = (dict(graph.phases), list(graph.edges))
    with pytest.raises(GraphError):
        graph.add_phase(Node("bad"), after="checkpoint", then="eval_epoch")
    assert (graph.phases, graph.edges) == before
    graph.add_phase(Node("good"), after="eval_epoch")  # not blocked by the refused one


def test_phases_added_after_the_same_phase_run_in_the_order_added(tmp_path: pathlib.Path) -> None:
    class Named(Snapshot):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 4}))
    first, second = Named("first"), Named("second")
    trainer.add_phase(first, after="eval_epoch", when=every_n_epochs(2))
    trainer.add_phase(second, after="eval_epoch")
    walk = [[name for name, _ in epoch.phases] for epoch in plan(trainer.machine, 4, 40)]
    assert walk[1] == ["train_epoch", "eval_epoch", "second"]
    assert walk[2] == ["train_epoch", "eval_epoch", "first", "second"]
    trainer.run()
    assert (first.epochs, second.epochs) == ([2, 4], [1, 2, 3, 4])


def test_every_n_steps_fires_after_each_epoch_that_crossed_a_multiple(tmp_path: pathlib.Path) -> None:
    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 7, "eval_every": 3}))  # 40 steps/epoch
    snapshot = Snapshot()
    trainer.add_phase(snapshot, after="train_epoch", when=every_n_steps(100))
    trainer.run()
    assert snapshot.epochs == [3, 5]  # epoch 3 is steps 81-120, epoch 5 is 161-200; epoch 7 (241-280) crosses none


def test_test_phase_without_a_dataset_is_refused_when_added(tmp_path: pathlib.Path) -> None:
    from phasetrain import DataError
    data = digits()
    trainer = Trainer(digits_config(tmp_path / "run", data=None), train_data=data["train"], eval_data=data["eval"])
    with pytest.raises(DataError, match="TestPhase 'test' has no dataset"):
        trainer.add_phase(TestPhase(), after="eval_epoch")


def test_add_phase_once_running_is_refused(tmp_path: pathlib.Path) -> None:
    class AddLate(Callback):
        def on_enter_train_epoch(self, trainer: Trainer) -> None:
            trainer.add_phase(Snapshot(), after="eval_epoch")

    with pytest.raises(GraphError, match="change phases before running"):
        Trainer(digits_config(tmp_path / "run"), callbacks=[AddLate()]).run()


# ---- rendering --------------------------------------------------------------------------------------

MERMAID_LINE = re.compile(r"^    (\[\*\]|[a-z_][a-z0-9_]*) --> (\[\*\]|[a-z_][a-z0-9_]*)(: [^:\n]+)?$"
                          r"|^    classDef [a-z_]+ [a-z-]+:[^ ]+( ?[,;]?[a-z-]+:[^ ,;]+)*$"
                          r"|^    class [a-z_][a-z0-9_]* [a-z_]+$")


def custom_trainer(tmp_path: pathlib.Path) -> Trainer:
    trainer = Trainer(digits_config(tmp_path / "run", train={"epochs": 2}))
    trainer.add_phase(TestPhase(every=2), after="eval_epoch")
    trainer.add_phase(Snapshot(), after="train_epoch", when=every_n_steps(50) & ~on_last_epoch())
    return trainer


def test_mermaid_and_dot_show_every_phase_and_conditional_edge_of_the_live_machine(tmp_path: pathlib.Path) -> None:
    trainer = custom_trainer(tmp_path)
    mermaid = trainer.render_graph()
    dot = trainer.render_graph(format="dot")
    assert isinstance(mermaid, str) and isinstance(dot, str)
    graph = trainer.machine.graph
    assert sorted(trainer.machine.transitions()) == sorted((e.source, e.dest) for e in graph.edges)
    for edge in graph.edges:
        label = edge_label(graph, edge)
        assert f"    {edge.source} --> {edge.dest}" + (f": {label}" if label else "") in mermaid.splitlines()
        assert f"    {edge.source} -> {edge.dest}" + (f' [label="{label}"];' if label else ";") in dot.splitlines()
    assert "    eval_epoch --> test: every 2 epochs" in mermaid
    assert '    train_epoch -> snapshot [label="every 50 steps and not last epoch"];' in dot
    # Mermaid stateDiagram-v2 structure: the header, then only transitions and styling statements.
    lines = mermaid.splitlines()
    assert lines[0] == "stateDiagram-v2" and lines[1] == "    [*] --> setup" and "    done --> [*]" in lines
    assert all(MERMAID_LINE.match(line) for line in lines[1:]), [x for x in lines[1:] if not MERMAID_LINE.match(x)]
    highlighted = trainer.render_graph(highlight="test")
    assert isinstance(highlighted, str) and highlighted.splitlines()[-1] == "    class test current"
    assert all(MERMAID_LINE.match(line) for line in highlighted.splitlines()[1:])


@pytest.mark.skipif(shutil.which("dot") is None and not os.environ.get("PHASETRAIN_REQUIRE_GRAPHVIZ"),
                    reason="Graphviz's dot is not installed (CI sets PHASETRAIN_REQUIRE_GRAPHVIZ: there this fails)")
def test_svg_and_png_are_drawn_by_graphviz(tmp_path: pathlib.Path) -> None:
    trainer = custom_trainer(tmp_path)
    svg = trainer.render_graph(tmp_path / "loop.svg")
    text = pathlib.Path(svg).read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert all(f">{phase}</text>" in text for phase in trainer.machine.graph.names)
    png = pathlib.Path(trainer.render_graph(tmp_path / "loop.png")).read_bytes()
    assert png.startswith(b"\x89PNG")


def test_missing_dot_names_the_package_to_install(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from phasetrain.render import RenderError
    trainer = custom_trainer(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without Graphviz
    with pytest.raises(RenderError, match=r"needs Graphviz's 'dot' program.*install the 'graphviz' package"):
        trainer.render_graph(tmp_path / "loop.svg")
    assert not (tmp_path / "loop.svg").exists()
    assert "stateDiagram-v2" in str(trainer.render_graph(format="mermaid"))  # text formats need nothing


# ---- config, CLI, diagrams --------------------------------------------------------------------------

def cli(*args: str, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phasetrain.cli", *args], check=False, capture_output=True,
                          text=True, cwd=cwd)


def test_plan_prints_the_walk_without_training(tmp_path: pathlib.Path) -> None:
    result = cli("plan", "examples/digits_test_phase.yaml", f"run_dir={tmp_path / 'run'}", "train.epochs=4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "  start:    setup",
        "  epoch 1 (steps 1-40): train_epoch -> eval_epoch [eval_due]",
        "  epoch 2 (steps 41-80): train_epoch -> eval_epoch [eval_due] -> test [every 2 epochs and not last epoch]",
        "  epoch 3 (steps 81-120): train_epoch -> eval_epoch [eval_due]",
        ("  epoch 4 (steps 121-160): train_epoch -> eval_epoch [eval_due] -> checkpoint [checkpoint_due] "
         "-> done [finished]"),
    ]
    assert not (tmp_path / "run").exists()


def test_config_phases_run_and_the_run_folder_graph_highlights_where_it_stopped(tmp_path: pathlib.Path) -> None:
    config = RunConfig.from_file(ROOT / "examples/digits_test_phase.yaml",
                                 overrides=[f"run_dir={tmp_path / 'run'}", "train.epochs=3", "train.progress_bar=false"])
    history = Trainer(config).run()
    assert len(history.get_metric_values("test/accuracy")) == 2  # the test phase after epoch 2, then done
    result = cli("graph", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "    class done current"
    result = cli("graph", "examples/digits_test_phase.yaml", "--format", "dot", "-o", str(tmp_path / "g.dot"))
    assert result.returncode == 0 and "eval_epoch -> test" in (tmp_path / "g.dot").read_text()


def test_a_run_folder_is_drawn_exactly_as_its_trainer_drew_it(tmp_path: pathlib.Path) -> None:
    trainer = custom_trainer(tmp_path)  # phases added in Python: the run's config.yaml does not name them
    trainer.run()
    run_dir = str(tmp_path / "run")
    mermaid, dot = cli("graph", run_dir), cli("graph", run_dir, "--format", "dot")
    assert mermaid.returncode == 0 and dot.returncode == 0, mermaid.stderr + dot.stderr
    assert mermaid.stdout == trainer.render_graph()  # both highlight done: the run finished
    assert dot.stdout == trainer.render_graph(format="dot")
    assert "    train_epoch --> snapshot: every 50 steps and not last epoch" in mermaid.stdout


# Importing this module leaves a file behind: a stand-in for any side effect a config's code may have.
MARKED_PHASE = '''
import pathlib
import phasetrain

pathlib.Path(__file__).with_name("imported.marker").write_text("imported")


class Marked(phasetrain.Phase):
    name = "marked"

    def run(self, trainer):
        pass
'''


def test_drawing_a_run_folder_imports_none_of_its_phases(tmp_path: pathlib.Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "marked_phase.py").write_text(MARKED_PHASE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "marked_phase", raising=False)  # imported fresh, and forgotten after
    marker = tmp_path / "imported.marker"
    config = digits_config(tmp_path / "run", train={"epochs": 1},
                           phases=[{"target": "marked_phase:Marked", "after": "eval_epoch"}])
    Trainer(config).run()
    assert marker.exists()  # the run imported it, as a run must
    marker.unlink()
    # From the folder the module sits in, as someone inspecting a received run would: importable if asked for.
    result = cli("graph", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # Added with no condition, the phase is eval_epoch's only way out: the edges after it are not drawn.
    lines = result.stdout.splitlines()
    assert "    eval_epoch --> marked" in lines and "    eval_epoch --> checkpoint: checkpoint_due" not in lines
    assert not marker.exists(), "phasetrain graph RUN_DIR imported the run's phase module"
    result = cli("graph", str(tmp_path / "run" / "config.yaml"), cwd=tmp_path)  # a config is code: it runs
    assert result.returncode == 0, result.stderr
    assert marker.exists()


def test_a_run_folder_without_a_stored_graph_or_with_overrides_gets_one_line(tmp_path: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(digits_config(run_dir).to_yaml())  # as an older phasetrain left it
    result = cli("graph", str(run_dir))
    assert result.returncode == 2
    assert result.stderr == (f"phasetrain: error: run folder {run_dir} has no graph.json (it was written by an older "
                             "phasetrain, or its run failed before setup finished); draw the graph from its config, "
                             f"which imports the config's phases: phasetrain graph {run_dir / 'config.yaml'}\n")
    result = cli("graph", str(run_dir), "train.eval_every=2")
    assert result.returncode == 2
    assert result.stderr == (f"phasetrain: error: overrides ['train.eval_every=2'] given with run folder {run_dir}: "
                             "a run's graph is the one it ran with; give a config file to draw it with overrides\n")
    (run_dir / "graph.json").write_text('{"phases": ["setup"]}')
    result = cli("graph", str(run_dir))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "graph.json is not a phase graph this phasetrain can read (version None, expected 1)" in result.stderr


def test_bad_phase_config_gets_one_clear_message(tmp_path: pathlib.Path) -> None:
    from phasetrain import ConfigError
    config = digits_config(tmp_path / "run", phases=[{"target": "phasetrain:TestPhase", "when": {"every_n_epoch": 2}}])
    with pytest.raises(ConfigError, match=r"phases\[0\].when: unknown condition 'every_n_epoch'; expected one of"):
        Trainer(config)
    config = digits_config(tmp_path / "run", phases=[{"target": "phasetrain:TestPhase", "after": "evaluate"}])
    with pytest.raises(GraphError, match="after='evaluate' names no phase"):
        Trainer(config)


def test_committed_diagrams_and_readme_graph_are_up_to_date() -> None:
    result = subprocess.run([sys.executable, "diagrams/render.py", "--check"], check=False, capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_phasetrain_quiets_its_own_transitions_only_and_respects_a_level_set_by_the_user(tmp_path: pathlib.Path,
                                                                                       caplog: pytest.LogCaptureFixture
                                                                                       ) -> None:
    import logging
    logger = logging.getLogger("transitions")
    assert logger.level == logging.NOTSET
    with caplog.at_level(logging.INFO):
        Trainer(digits_config(tmp_path / "a", train={"epochs": 1})).run()
    assert logger.level == logging.NOTSET  # nothing changed for the rest of the process
    assert not [r for r in caplog.records if r.name.startswith("transitions")]
    logger.setLevel(logging.INFO)  # someone debugging the machine asks for its lines
    try:
        with caplog.at_level(logging.INFO, logger="transitions"):
            Trainer(digits_config(tmp_path / "b", train={"epochs": 1})).run()
        assert any(r.name.startswith("transitions") for r in caplog.records)
    finally:
        logger.setLevel(logging.NOTSET)
