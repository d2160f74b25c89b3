"""Seeded bugs, one at a time: does the suite notice? A small mutation run over the riskiest
modules (claims, trial outcomes, halving, resume, precision, credentials, promote, reproduce,
the report's front), each mutant checked by the tests that should catch it.

    .venv/bin/python tests/mutation/run.py              # every mutant (about 10 minutes)
    .venv/bin/python tests/mutation/run.py claims join  # those whose name holds a word

For each mutant the source is changed in place (one exact snippet, which must occur once),
its tests run with `pytest -x`, and the file is restored, whatever happens. A mutant is
killed when its tests fail. Prints one line per mutant and the score; exit code 1 under 90 %.
Not part of CI (it runs the same tests many times); its last score is in docs/development.md.
It changes the working tree while it runs: run nothing else from this checkout meanwhile.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "fractal_mlops"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # below fractal_mlops/
    before: str
    after: str
    tests: tuple[str, ...]  # pytest arguments that should catch it


INVARIANTS_STUDY = "tests/study/test_study_invariants.py"
INVARIANTS_ENGINE = "tests/engine/test_engine_invariants.py"
INVARIANTS_REGISTRY = "tests/registry/test_registry_invariants.py"
RESUME = "tests/engine/test_training_state.py"

MUTANTS = [
    # halving
    Mutant("halving: rung size rounded up", "search/halving.py",
           "keep = max(1, size // search.reduction_factor)",
           "keep = max(1, -(-size // search.reduction_factor))", (INVARIANTS_STUDY,)),
    Mutant("halving: a one-rung plan is not last", "search/halving.py",
           "return RungWork(trial, variant, plan[0], len(plan) == 1), 0",
           "return RungWork(trial, variant, plan[0], False), 0",
           ("tests/study/test_halving.py", "-k", "one_rung")),
    Mutant("halving: rung records its best epoch", "search/halving_trial.py",
           "(f\"rung_{rung.number}_val_acc\", results.last_val_acc)",
           "(f\"rung_{rung.number}_val_acc\", results.best_val_acc)", (INVARIANTS_STUDY,)),
    Mutant("halving: ranks the worst first", "search/halving.py",
           "key=lambda t: (-t.user_attrs[key], order[t.params[\"variant\"]])",
           "key=lambda t: (t.user_attrs[key], order[t.params[\"variant\"]])",
           ("tests/study/test_halving.py", "-k", "with_two_workers")),
    # the engine
    Mutant("join: never drops the last input", "engine/model.py",
           "keep = [drop_rng.random() >= drop_prob for _ in inputs]",
           "keep = [drop_rng.random() >= drop_prob for _ in inputs[:-1]] + [True]",
           (INVARIANTS_ENGINE,)),
    Mutant("join: keeps none sometimes", "engine/model.py",
           "keep[drop_rng.randrange(len(inputs))] = True", "pass", (INVARIANTS_ENGINE,)),
    Mutant("memory: training peak read after evaluation", "engine/train.py",
           "gpu_peak, gpu_reserved = self.memory.gpu_mb()\n            val_loss, val_acc = self.evaluate()",
           "val_loss, val_acc = self.evaluate()\n            gpu_peak, gpu_reserved = self.memory.gpu_mb()",
           (INVARIANTS_ENGINE, "-k", "peak")),
    Mutant("resume: mid-epoch restarts the epoch", "engine/data.py",
           "for start in range(start_step * self.batch_size, len(self.x), self.batch_size):",
           "for start in range(0, len(self.x), self.batch_size):", (RESUME,)),
    Mutant("resume: drop-path stream not restored", "engine/train.py",
           "            drop_rng.setstate(state[\"drop_rng\"])", "            pass", (RESUME,)),
    Mutant("resume: running sums lost", "engine/train.py",
           "self._resume = _EpochSoFar(**state[\"epoch_so_far\"]) if \"epoch_so_far\" in state else None",
           "self._resume = None", (RESUME,)),
    Mutant("precision: auto takes the slowest", "engine/autotune.py",
           "best = min(options, key=lambda option: step_ms[option.name])",
           "best = max(options, key=lambda option: step_ms[option.name])", (RESUME,)),
    Mutant("precision: candidates timed on their own drop-path draws", "engine/autotune.py",
           "model.drop_path = \"local\" if before == \"local+global\" else before",
           "model.drop_path = before", (RESUME,)),
    Mutant("precision: measuring moves the random streams", "engine/autotune.py",
           "        torch.set_rng_state(state[0])\n", "", (RESUME,)),
    Mutant("data: normalized with the whole set's statistics", "engine/data.py",
           "scaled.std(dim=(0, 2, 3))", "scaled.std(dim=(0, 2, 3)) * 1.01", (INVARIANTS_ENGINE,)),
    # claims, liveness, outcomes
    Mutant("liveness: a reused pid is alive", "stores/optuna_storage.py",
           "return started != \"?\" and _process_start(int(pid)) not in (started, \"?\")",
           "return False", (INVARIANTS_STUDY,)),
    Mutant("heartbeat: stops at the first store error", "search/claims.py",
           "            except Exception:  # noqa: BLE001 - the store hiccuped: beat again next time\n"
           "                continue",
           "            except Exception:  # noqa: BLE001 - the store hiccuped: beat again next time\n"
           "                return", (INVARIANTS_STUDY,)),
    Mutant("orphans: keyed by the storage-wide trial ID", "search/claims.py",
           "finished = {t.number: t for t in study.get_trials(deepcopy=False) if t.state.is_finished()}",
           "finished = {t._trial_id: t for t in study.get_trials(deepcopy=False) if t.state.is_finished()}",
           (INVARIANTS_STUDY,)),
    Mutant("outcomes: an out-of-memory point retried forever", "search/outcome.py",
           "if reason not in RETRYABLE or ooms[point] >= OOM_TRIES}",
           "if reason not in RETRYABLE}", ("tests/study/test_outcome.py",)),
    Mutant("outcomes: Ctrl-C does not stop the worker", "search/outcome.py",
           "return Outcome(TrialState.FAIL, INTERRUPTED, killed=True, stops_worker=True)",
           "return Outcome(TrialState.FAIL, INTERRUPTED, killed=True)", ("tests/study/test_outcome.py",)),
    Mutant("resume: a final failure is continued", "search/claims.py",
           "    if last.user_attrs.get(REASON_ATTR) not in RETRYABLE:\n        return None\n", "",
           (INVARIANTS_STUDY,)),
    Mutant("resume: the first attempt's run, not the last", "search/claims.py",
           "last = max(attempts, key=lambda t: t.number)",
           "last = min(attempts, key=lambda t: t.number)", (INVARIANTS_STUDY,)),
    Mutant("restart: reported epochs ignored", "stores/repair.py",
           "return all(t.state == TrialState.FAIL and not t.intermediate_values",
           "return all(t.state == TrialState.FAIL", (INVARIANTS_STUDY,)),
    Mutant("workers: memory check for one worker only", "search/preflight.py",
           "if free is not None and workers * need > free:", "if free is not None and need > free:",
           (INVARIANTS_STUDY,)),
    Mutant("leaderboard: worst first", "search/progress.py",
           "key=lambda r: (-(r.value or 0.0), r.params or 0))",
           "key=lambda r: ((r.value or 0.0), r.params or 0))", (INVARIANTS_STUDY,)),
    Mutant("epochs: logged at step 0", "tracking/tracker.py",
           "metrics = [Metric(k, v, now, result.epoch) for k, v in result.metrics().items()]",
           "metrics = [Metric(k, v, now, 0) for k, v in result.metrics().items()]",
           (INVARIANTS_STUDY,)),
    # credentials
    Mutant("credentials: sig= shown", "stores/credentials.py",
           '_SECRET_KEYS = {"pwd", "pass", "sig", "key", "auth", "code"}',
           '_SECRET_KEYS = {"pwd", "pass", "key", "auth", "code"}',
           ("tests/study/test_credentials.py", "-k", "every_form")),
    Mutant("credentials: libpq sslpassword shown", "stores/credentials.py",
           "(password|passwd|pwd|sslpassword|token|secret|api_key|apikey)",
           "(password|passwd|pwd|token|secret|api_key|apikey)",
           ("tests/study/test_credentials.py", "-k", "every_form")),
    # promote, report, reproduce
    Mutant("promote: counts maximized", "promote.py",
           '_LOWER_IS_BETTER = re.compile(r"(loss|seconds|_mb|_count)$")',
           '_LOWER_IS_BETTER = re.compile(r"(loss|seconds|_mb)$")', (INVARIANTS_REGISTRY,)),
    Mutant("report: front on the wrong axis", "reporting/figures.py",
           "key=lambda t: (t.metrics[\"param_count\"], -t.metrics[\"final_val_acc\"]))",
           "key=lambda t: (-t.metrics[\"param_count\"], -t.metrics[\"final_val_acc\"]))",
           (INVARIANTS_REGISTRY,)),
    Mutant("reproduce: a missing epoch matches", "search/comparison.py",
           "            self.differing.add(epoch)\n        for epoch, values in new.items():",
           "            pass\n        for epoch, values in new.items():", (INVARIANTS_REGISTRY,)),
    # the CLI
    Mutant("cli: bad input exits 1", "cli.py",
           "        error_line(str(exc))\n        return EXIT_BAD_INPUT",
           "        error_line(str(exc))\n        return EXIT_FAULT", ("tests/test_cli.py",)),
    Mutant("config: checkpoint_minutes changes the study's hash", "config/experiment.py",
           "        out[\"training\"].pop(\"checkpoint_minutes\")  # when a trial saves, not what it "
           "learns\n", "", (RESUME,)),
]


def run(mutant: Mutant) -> tuple[bool, float]:
    path = PACKAGE / mutant.path
    original = path.read_text()
    if original.count(mutant.before) != 1:
        raise SystemExit(f"{mutant.name}: the snippet occurs {original.count(mutant.before)} "
                         f"times in {mutant.path}; update tests/mutation/run.py")
    started = time.monotonic()
    try:
        path.write_text(original.replace(mutant.before, mutant.after))
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               *mutant.tests], cwd=REPO, capture_output=True, text=True,
                              timeout=900)
    finally:
        path.write_text(original)
    return done.returncode != 0, time.monotonic() - started


def main(words: list[str]) -> int:
    # a SIGTERM (or Ctrl-C) lands as an exception, so `run` puts the source back
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    chosen = [m for m in MUTANTS if not words or any(w in m.name for w in words)]
    killed = 0
    for mutant in chosen:
        caught, seconds = run(mutant)
        killed += caught
        print(f"{'killed  ' if caught else 'SURVIVED'} {seconds:5.1f} s  {mutant.name}", flush=True)
    score = killed / len(chosen) if chosen else 1.0
    print(f"{killed} of {len(chosen)} mutants killed: {score:.0%}")
    return 0 if score > 0.9 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
