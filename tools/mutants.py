"""Break one feature at a time in a scratch copy of the project and check that a test goes red.

    python tools/mutants.py                 # every mutant (about 20 minutes on 2 cores)
    python tools/mutants.py "bf16" "CRC"    # only the mutants whose name contains one of these

Each mutant is one exact source edit; the listed tests run against the edited copy (PYTHONPATH
points at it) and must fail. Not part of CI: it is the evidence behind "a test fails when the
feature breaks", to re-run after changing a feature or its tests.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

SRC = pathlib.Path(__file__).resolve().parents[1]
MUTANTS = [
    # (name, file, original, mutated, tests)
    ("mid-epoch checkpoint saving removed", "src/phasetrain/trainer.py",
     "        if every and state.optimizer_step % every == 0:\n            self.save_checkpoint()",
     "        if False:\n            self.save_checkpoint()", "tests/test_resume.py"),
    ("monitor always fresh", "src/phasetrain/bookkeeping.py",
     "current = self.measured_at == (state.epoch, state.optimizer_step)", "current = True",
     "tests/test_retention.py"),
    ("add_callback does not replace defaults", "src/phasetrain/trainer.py",
     "self.callbacks = self._callback_list(with_callbacks(self._user_callbacks(), [callback], self.default_callbacks()))",
     "self.callbacks = self._callback_list([*self._user_callbacks(), callback])", "tests/test_training.py"),
    ("bf16 ignored", "src/phasetrain/accelerator.py",
     "accelerator = Accelerator(mixed_precision=mixed_precision)", "accelerator = Accelerator(mixed_precision='no')",
     "tests/test_training.py"),
    ("accumulation: no short last group", "src/phasetrain/batches.py",
     "return min(self.per_step, self.batches - group_start)", "return self.per_step",
     "tests/test_training.py tests/test_core.py tests/test_resume.py"),
    ("eval sharding: every process evaluates everything", "src/phasetrain/batches.py",
     "sampler = self._sampler(dataset, batch_size, shuffle=False, drop_last=False, pad=False, epoch=0)",
     "sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=False, drop_last=False, seed=self._seed, epoch=0)",
     "tests/test_core.py tests/test_distributed.py"),
    ("data order ignores the epoch", "src/phasetrain/data.py",
     "return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)", "return seed * 1_000_003 % (2**63 - 1)",
     "tests/test_core.py"),
    ("data order drawn from the global RNG", "src/phasetrain/data.py",
     "order = torch.randperm(size, generator=generator).tolist()", "order = torch.randperm(size).tolist()",
     "tests/test_core.py tests/test_resume.py"),
    ("RNG not restored", "src/phasetrain/rng.py",
     "        n = state[\"numpy\"]\n        restore_rng(", "        n = state[\"numpy\"]\n        return\n        restore_rng(",
     "tests/test_resume.py"),
    ("checkpoint CRC not checked", "src/phasetrain/checkpoint_files.py",
     "if crc32(file) != expected[\"crc32\"]:", "if False:", "tests/test_resume.py"),
    ("resume does not re-enter its phase", "src/phasetrain/machine.py",
     "        self._on_enter(self.state.phase, None)", "        if not self.state.resumed:\n            self._on_enter(self.state.phase, None)",
     "tests/test_resume.py tests/test_training.py"),
    ("a saved stop request ignored on resume", "src/phasetrain/trainer.py",
     "batches = () if state.stop_requested else self.data", "batches = self.data", "tests/test_resume.py"),
    ("micro-batch counted after its forward", "src/phasetrain/trainer.py",
     "            state.micro_step += 1  # counted before the forward: a checkpoint from now to the step is refused\n            last = state.micro_step == group_size",
     "            last = state.micro_step + 1 == group_size", "tests/test_resume.py"),
    ("then into train_epoch without the finished edge", "src/phasetrain/graph.py",
     "return ([Edge(name, LAST, run_finished())] if then == EPOCH else []) + [Edge(name, then)]",
     "return [Edge(name, then)]", "tests/test_graph.py"),
    ("then phases leave the order", "src/phasetrain/graph.py",
     "            if member in self._diverting:", "            if member in self._diverting or True:", "tests/test_graph.py"),
    ("phase_finished ignored", "src/phasetrain/trainer.py",
     "        if phase_finished:\n            self.state.phase_complete = True", "        pass", "tests/test_resume.py"),
    ("callback state not checked for plain data", "src/phasetrain/checkpoint.py",
     "    elif type(value) not in _PLAIN_TYPES:", "    elif False:", "tests/test_resume.py"),
    ("custom loop step loss not fed", "src/phasetrain/losses.py",
     "        if not self._fed:\n            self.add(", "        if False:\n            self.add(", "tests/test_core.py"),
    ("resumed flag never set", "src/phasetrain/checkpoint.py",
     "state.epochs, state.resumed = config.train.epochs, True", "state.epochs = config.train.epochs",
     "tests/test_resume.py"),
    ("the machine does not start epochs", "src/phasetrain/machine.py",
     "            state.start_epoch()\n        self._on_enter(phase, edge)", "            pass\n        self._on_enter(phase, edge)",
     "tests/test_training.py"),
    ("bookkeeping methods overridable", "src/phasetrain/trainer.py",
     "            if name in cls.__dict__:", "            if False:", "tests/test_core.py"),
    ("replace_phase keeps the old handler", "src/phasetrain/graph.py",
     "old, self.phases[phase.name] = self.phases[phase.name], phase", "old = self.phases[phase.name]",
     "tests/test_core.py"),
    ("plateau scheduler not stepped", "src/phasetrain/bookkeeping.py",
     "            self.scheduler.step(record[self.monitor])", "            pass", "tests/test_training.py"),
    ("train loss not reset between epochs", "src/phasetrain/losses.py",
     "        if epoch != self.epoch:\n            self.epoch = epoch\n            self._reset(0.0, 0)",
     "        if epoch != self.epoch:\n            self.epoch = epoch", "tests/test_training.py tests/test_resume.py"),
    ("plan does not count steps", "src/phasetrain/plan.py",
     "                state.optimizer_step += steps_per_epoch or 0", "                pass", "tests/test_graph.py"),
    ("checkpoint format version not checked", "src/phasetrain/checkpoint.py",
     "    if saved.get(\"format_version\") != FORMAT_VERSION:", "    if False:", "tests/test_resume.py"),
    ("RunConfig(...) raises pydantic's error", "src/phasetrain/config.py",
     "            raise ConfigError(describe_validation_error(exc, _SOURCE.get())) from None", "            raise",
     "tests/test_bad_input.py"),
    ("signal stop ignored mid-epoch", "src/phasetrain/trainer.py",
     "        if self._signals.pending(state.optimizer_step):\n            self._stop_for_signal()",
     "        if False:\n            self._stop_for_signal()", "tests/test_resume.py tests/test_kill.py"),
    ("per-process train loss not checkpointed", "src/phasetrain/trainer.py",
     "return {\"rng\": ProcessRNG(), \"train_loss\": self._train_loss}", "return {\"rng\": ProcessRNG()}",
     "tests/test_resume.py"),
    ("progress bar of a resumed epoch starts at 0", "src/phasetrain/callbacks.py",
     "state.optimizer_step - state.epoch_start_step,", "0,", "tests/test_resume.py"),
    ("transitions logger left at INFO", "src/phasetrain/machine.py",
     "    if logger.level != logging.NOTSET:", "    if True:", "tests/test_graph.py"),
    ("replace with after/when/then accepted", "src/phasetrain/config.py",
     "        if self.replace is not None and given:", "        if False:", "tests/test_core.py"),
    ("phase state not checkpointed", "src/phasetrain/trainer.py",
     "\"phases\": self.machine.graph, ", "", "tests/test_graph.py tests/test_resume.py"),
    # Issue 8: nothing lost, nothing silently wrong.
    ("fault: metrics file not rewritten on resume", "src/phasetrain/callbacks.py",
     "            self._rewrite(self.path(trainer))", "            pass", "tests/test_faults.py"),
    ("fault: no lock on the run folder", "src/phasetrain/run_folder.py",
     "            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "            pass", "tests/test_faults.py"),
    ("fault: flock, which forked workers keep held", "src/phasetrain/run_folder.py",
     "            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n        except OSError as exc:",
     "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n        except BlockingIOError as exc:",
     "tests/test_faults.py"),
    ("fault: NaN loss not checked", "src/phasetrain/trainer.py",
     "        finite = math.isfinite(value)  #", "        finite = True  #", "tests/test_faults.py"),
    ("fault: NaN decided per process", "src/phasetrain/trainer.py",
     "        if self.accelerator.num_processes > 1:\n            flag", "        if False:\n            flag",
     "tests/test_distributed.py"),
    ("fault: config changes on resume not refused", "src/phasetrain/resume_changes.py",
     "    if refused:", "    if False:", "tests/test_faults.py tests/test_resume.py"),
    ("fault: changed optimizer args not applied", "src/phasetrain/resume_changes.py",
     "            _set_hyperparameter(optimizer,", "            (lambda *_: None)(optimizer,", "tests/test_faults.py"),
    ("fault: manifest need not list every file", "src/phasetrain/checkpoint_files.py",
     "    unlisted = sorted(", "    unlisted = [] and sorted(", "tests/test_checkpoint_faults.py"),
    ("fault: latest may name a path", "src/phasetrain/run_folder.py",
     " or \"/\" in name", "", "tests/test_faults.py"),
    ("fault: workers die on the group's SIGTERM", "src/phasetrain/data.py",
     "worker_init_fn=worker_init(num_workers)", "worker_init_fn=None", "tests/test_data_faults.py"),
    ("fault: bad item not named", "src/phasetrain/loading.py",
     "            raise self._error(", "            raise exc or self._error(", "tests/test_data_faults.py"),
]

def run(selected):
    results = []
    for name, file, original, mutated, tests in MUTANTS:
        if selected and not any(s in name for s in selected):
            continue
        work = pathlib.Path(tempfile.gettempdir()) / "phasetrain-mutant"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(SRC, work, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info"))
        path = work / file
        text = path.read_text()
        assert text.count(original) == 1, (name, "original not found once")
        path.write_text(text.replace(original, mutated))
        env = {**os.environ, "PYTHONPATH": f"{work}/src:{work}"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "--timeout=90", "-p", "no:cacheprovider", *tests.split()],
                           cwd=work, env=env, capture_output=True, text=True, check=False)
        failed = [l for l in r.stdout.splitlines() if l.startswith("FAILED")]
        verdict = f"caught by {failed[0].split(' - ')[0].removeprefix('FAILED ')}" if r.returncode else "NOT CAUGHT"
        print(f"{name}: {verdict}", flush=True)
        results.append((name, verdict))
    return results

if __name__ == "__main__":
    run(sys.argv[1:])
