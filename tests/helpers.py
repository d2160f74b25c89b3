"""Helpers shared by the tests of every stage (engine, study, registry).

No fixtures and no tests here: a fixture lives in the conftest.py of the stage that uses it
(tests/conftest.py for those of every stage), where pytest finds it. Test modules import from
this module and from `servers` (real PostgreSQL / `mlflow server` processes), never from
another test module or a conftest.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from torch import nn

    from fractal_mlops.engine.model import FractalNet

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
EXPERIMENTS = REPO / "experiments"


# -- commands ---------------------------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a command, without the caller's MLflow / Optuna store and thread
    settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "FRACTAL_STORAGE", "FRACTAL_THREADS")}
    env.update(extra)
    return env


def run_module(module: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m <module> args...` in a fresh interpreter, as a user would run it: in `cwd`
    (default: the repository), with `env` (default: `clean_env()`), for at most `timeout`
    seconds (the default fits a command that trains nothing)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO,
                          env=clean_env() if env is None else env, capture_output=True,
                          text=True, timeout=timeout)



def other_host_command(hostname: str) -> list[str]:
    """A prefix that runs a command under another host name, as a worker on another machine
    (or in another Kubernetes pod) runs: a UTS namespace, which needs root. Where it cannot
    run: the test is skipped, and fails under CI (servers.missing_tool)."""
    import shutil

    from servers import missing_tool

    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--uts", "true"], capture_output=True).returncode == 0:
        return [unshare, "--uts", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh"]
    missing_tool("running a worker under another host name needs `unshare --uts` (root)")
    return []


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Bad input as the user sees it: exit code 2 and one line on stderr, no traceback, holding
    each of `words` (any case). Returns the line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]

# -- experiment configs -----------------------------------------------------------------------

# A small digits study: two variants, two epochs.
DIGITS_STUDY = {
    "study_name": "tiny",
    "data": {"name": "digits"},
    "space": {"blocks": [1], "columns": [1, 2], "width": [8],
              "unit": ["conv-norm-act", "conv-act-norm"], "drop_path": ["local+global"]},
    "training": {"epochs": 2, "batch_size": 64, "lr": 0.1, "seed": 0},
    "pruning": {"warmup_epochs": 1, "chance_margin": 0.05},
}


def write_config(path: Path, base: dict | None = DIGITS_STUDY, **sections) -> Path:
    """An experiment YAML at `path`: `base` (default: DIGITS_STUDY; None: nothing) with
    `sections` over it, a dict merged into base's section of that name (e.g. space={...},
    training={...}), anything else replacing it."""
    config = dict(base or {})
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# A grid point that trains for several seconds (~0.05 s per epoch here): a test that signals or
# kills a worker once its trial has recorded an epoch lands in the middle of the training.
LONG_TRIAL = {"space": {"blocks": [1], "columns": [2], "width": [8],
                        "unit": ["conv-norm-act", "conv-act-norm"]},
              "training": {"epochs": 40}}


# -- studies ----------------------------------------------------------------------------------

def load_optuna_study(storage: str, study_name: str):
    """The study as the CLI sees it (`storage`: anything --storage accepts)."""
    import optuna

    from fractal_mlops.stores.optuna_storage import open_storage, resolve_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study_name,
                             storage=open_storage(resolve_storage(storage, None)))


class StudyDir:
    """A working directory with its own stores; runs the real CLI in subprocesses."""

    def __init__(self, root: Path, tracking_uri: str | None = None,
                 storage: str | None = None) -> None:
        self.root = root
        self.tracking_uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.storage = storage or f"journal:{root / 'optuna.journal'}"

    def args(self, *extra: str) -> list[str]:
        return ["--tracking-uri", self.tracking_uri, "--storage", self.storage, *extra]

    def env(self) -> dict[str, str]:
        return clean_env(FRACTAL_MLOPS_CACHE=str(self.root / "cache"))

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("env", self.env())
        return subprocess.Popen([sys.executable, "-m", "fractal_mlops.study", *argv],
                                cwd=self.root, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)

    def run(self, *argv: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        proc = self.popen(*argv, **kwargs)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    def runs(self, experiment: str, role: str = "trial"):
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], f"tags.`fractal.role` = '{role}'",
                                  max_results=1000)

    def running_trial_runs(self) -> list[str]:
        """RUNNING trial runs. Fails (never answers "none") when the store cannot be read."""
        return list(self.running_trial_epochs())

    def running_trial_epochs(self) -> dict[str, int]:
        """RUNNING trial runs and the number of epochs each has recorded (SQLite: read straight
        from the file, cheap enough to poll)."""
        if not self.tracking_uri.startswith("sqlite:///"):
            client = self.client()
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(
                experiments, "attributes.status = 'RUNNING' and tags.`fractal.role` = 'trial'")
            return {r.info.run_id: len(client.get_metric_history(r.info.run_id, "val_acc"))
                    for r in runs}
        db = Path(self.tracking_uri.split(":///", 1)[1])
        if not db.is_file():
            raise AssertionError(f"no MLflow store at {db}")
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
            return dict(conn.execute(
                "SELECT r.run_uuid, (SELECT COUNT(*) FROM metrics m WHERE m.run_uuid = r.run_uuid "
                "AND m.key = 'val_acc') FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE r.status = 'RUNNING' AND t.key = 'fractal.role' AND t.value = 'trial'"))

    def wait_for_running_trial(self, proc: subprocess.Popen, epochs: int = 1,
                               timeout: float = 300) -> str:
        """The run ID of a trial that is RUNNING and has recorded at least `epochs` epochs: an
        event in the store, so a signal sent now lands in the middle of training (with a
        config of tens of epochs), whatever the speed of the machine."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                running = self.running_trial_epochs()
            except (AssertionError, sqlite3.OperationalError):  # not created yet, or busy
                running = {}
            ready = [run_id for run_id, done in running.items() if done >= epochs]
            if ready:
                return ready[0]
            if proc.poll() is not None:
                raise AssertionError(f"study ended before a trial ran: {proc.stderr.read()}")
            time.sleep(0.1)
        raise AssertionError(f"no trial recorded {epochs} epoch(s) within {timeout:.0f} s")

    def optuna_study(self, study_name: str):
        return load_optuna_study(self.storage, study_name)

    def optuna_trials(self, study_name: str):
        return self.optuna_study(study_name).get_trials()


def finished_points(trials) -> collections.Counter:
    return collections.Counter(t.params["variant"] for t in trials if t.state.is_finished()
                               and t.user_attrs.get("reason") != "worker lost")


def kill_mid_trial_then_resume(study: StudyDir, config, *argv: str) -> None:
    """kill -9 a worker once its trial has recorded an epoch, run the same command again: the
    lost trial is FAIL "worker lost" in Optuna, and the point's next trial continues its MLflow
    run from the last saved state to the end; every point finishes once."""
    study_name = yaml.safe_load(config.read_text())["study_name"]
    proc = study.popen("--config", str(config), *argv)
    run_id = study.wait_for_running_trial(proc, epochs=1)
    lost_number = int(study.client().get_run(run_id).data.tags["optuna.trial_number"])
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert study.client().get_run(run_id).info.status == "RUNNING"  # nobody closed it yet

    resumed = study.run("--config", str(config), *argv)
    assert resumed.returncode == 0, resumed.stderr

    trials = study.optuna_trials(study_name)
    [lost] = [t for t in trials if t.number == lost_number]
    assert lost.state.name == "FAIL" and lost.user_attrs["reason"] == "worker lost"
    continued = study.client().get_run(run_id)  # the next trial of the point carried it on
    assert continued.info.status == "FINISHED", continued.data.tags
    assert continued.data.tags["fractal.state"] in ("COMPLETE", "PRUNED")
    [successor] = [t for t in trials if t.number == int(continued.data.tags["optuna.trial_number"])]
    assert successor.number > lost_number and successor.user_attrs["mlflow_run_id"] == run_id
    assert successor.params["variant"] == lost.params["variant"]
    points = finished_points(trials)
    assert set(points.values()) == {1} and len(points) == 2  # every point once, the lost one too
    assert not study.running_trial_runs()


# -- data -------------------------------------------------------------------------------------

IMAGE_CLASSES = ["cat", "dog", "ship"]


def write_image(path: Path, value: int, size: int = 32) -> None:
    """A small RGB image whose left half is brighter than its right half (not mirror-symmetric)."""
    import numpy as np
    from PIL import Image

    pixels = np.full((size, size, 3), value, dtype=np.uint8)
    pixels[:, : size // 2] = min(value + 60, 255)
    Image.fromarray(pixels).save(path)


def image_folder(root: Path, per_class: int = 3) -> Path:
    """An image-folder dataset (train/ and test/, one folder per class of IMAGE_CLASSES, PNGs
    and JPEGs) with one file that is not an image."""
    for offset, split in enumerate(("train", "test")):
        for label, name in enumerate(IMAGE_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                suffix = ".png" if i % 2 == 0 else ".jpg"
                write_image(folder / f"{i:04d}{suffix}", 30 * label + 10 * i + 5 * offset)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


# -- models -----------------------------------------------------------------------------------

def seed(value: int) -> None:
    """What a FractalNet draws from: torch's RNG (weights, dropout), drop_rng (drop-path)."""
    import torch

    from fractal_mlops.engine.model import drop_rng

    torch.manual_seed(value)
    drop_rng.seed(value)


def convs(module: nn.Module) -> list[nn.Conv2d]:
    from torch import nn

    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


class ConvCalls:
    """Counts conv forward calls per fractal block."""

    def __init__(self, model: FractalNet) -> None:
        self.per_block = [0] * len(model.blocks)
        for index, block in enumerate(model.blocks):
            for conv in convs(block):
                conv.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def count(module, inputs, output):
            self.per_block[index] += 1
        return count

    def reset(self) -> None:
        self.per_block = [0] * len(self.per_block)


def loss_and_grads(checkpointing: bool, drop_path: str, **options):
    """Loss and gradients of one training step of a small 4-column FractalNet, seeded."""
    import torch
    from torch import nn

    from fractal_mlops.engine.model import FractalNet

    seed(0)
    # 4 columns: joins with drop decisions run inside the checkpointed halves, too
    model = FractalNet(blocks=2, columns=4, width=8, unit="conv-norm-act-drop", norm="batch",
                       activation="relu", dropout=0.2, drop_path=drop_path,
                       grad_checkpointing=checkpointing, **options).train()
    x = torch.randn(8, 3, 16, 16)
    labels = torch.randint(0, 10, (8,))
    seed(123)
    loss = nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    # units a globally dropped column skips get no gradient at all
    return loss.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                           for n, p in model.named_parameters()}


def structural_fingerprint(module, memo: dict | None = None) -> str:
    """What a built network is, as a hash over its module tree (a Merkle hash).

    Each module contributes its type and extra_repr (channels, kernel, bias, norm groups,
    activation, dropout p; for FractalNet: columns and drop-path) and, in registration
    order (= forward order inside a unit), the names and fingerprints of its children.
    `memo` lets modules shared between models be hashed once (it keeps them alive, so that
    an id is never reused while it is in the memo).
    """
    if memo is not None and id(module) in memo:
        return memo[id(module)][1]
    digest = hashlib.sha256(f"{type(module).__name__}({module.extra_repr()})".encode())
    for name, child in module.named_children():
        digest.update(f"|{name}={structural_fingerprint(child, memo)}".encode())
    result = digest.hexdigest()
    if memo is not None:
        memo[id(module)] = (module, result)
    return result


# -- MLflow stores and the registry -----------------------------------------------------------

# The two studies of the registry tests' `studied_store` fixture (tests/registry/conftest.py).
TINY, LATER = "registry-tiny", "registry-later"


@dataclass(frozen=True)
class Store:
    """A local MLflow store: its SQLite database (artifacts live where its experiments say)."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.db}"


def run_study(config: dict, store: Store, journal: Path,
              tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    """The study of `config` into `store` (or into `tracking_uri`, e.g. a tracking server)."""
    path = write_config(store.root / f"{config['study_name']}.yaml", base=None, **config)
    done = run_module("fractal_mlops.study", "--config", str(path),
                      "--tracking-uri", tracking_uri or store.uri,
                      "--storage", f"journal:{journal}", "--device", "cpu", cwd=store.root,
                      timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def mlflow_client(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)  # the registry's SQL store resolves models:/ URIs through it
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def trial_runs(client, experiment: str, role: str = "trial") -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`fractal.role` = '{role}'",
                              max_results=1000)


def expected_best(runs: list) -> object:
    """What promote must pick: the COMPLETE trial with the highest final_val_acc (ties: fewer
    parameters), computed here straight from the runs."""
    complete = [r for r in runs if r.data.tags.get("fractal.state") == "COMPLETE"]
    return min(complete, key=lambda r: (-r.data.metrics["final_val_acc"],
                                        r.data.metrics["param_count"]))


def versions(client, name: str = "FractalNet") -> list:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def alias_version(client, alias: str, name: str = "FractalNet") -> str | None:
    aliases = client.get_registered_model(name).aliases
    return str(aliases[alias]) if alias in aliases else None
