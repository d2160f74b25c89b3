"""The champion loads by alias in-process and answers the same over `mlflow models serve`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, clean_env, mlflow_client, run_module
from servers import free_port

CHAMPION = "models:/FractalNet@champion"
START_TIMEOUT = 180  # seconds; `mlflow models serve` imports torch and MLflow in two processes


def digits_batch(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Real validation digits, normalized exactly as training fed them to the model."""
    import torch

    from fractal_mlops.config.sections import DataConfig
    from fractal_mlops.engine.data import DeviceLoader, load_dataset

    data = load_dataset(DataConfig(name="digits"))
    loader = DeviceLoader(data.val_x[:n], data.val_y[:n], n, data.mean, data.std,
                          torch.device("cpu"))
    images, labels = next(iter(loader))
    return images.numpy().astype(np.float32), labels.numpy()


def wait_until_up(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited ({server.returncode}):\n"
                        + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer /ping in {START_TIMEOUT} s:\n"
                + log.read_text()[-3000:])


def stop_group(server: subprocess.Popen) -> None:
    """Stop the server and the uvicorn process it started (one process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    with contextlib.suppress(ProcessLookupError):  # a worker that outlived its parent
        os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.slow
def test_champion_serves_the_same_class_scores_as_the_in_process_model(store, tmp_path):
    import mlflow
    import torch

    promoted = run_module("fractal_mlops.promote", "--experiment", TINY, "--tracking-uri",
                          store.uri, timeout=300)
    assert promoted.returncode == 0, promoted.stderr
    mlflow_client(store.uri)  # sets the process-wide tracking URI that models:/ resolves with
    images, labels = digits_batch()

    pyfunc_scores = mlflow.pyfunc.load_model(CHAMPION).predict(images)
    network = mlflow.pytorch.load_model(CHAMPION).eval()
    with torch.no_grad():
        torch_scores = network(torch.from_numpy(images)).numpy()
    assert pyfunc_scores.shape == (len(images), 10)
    np.testing.assert_allclose(pyfunc_scores, torch_scores, atol=1e-5)
    assert (pyfunc_scores.argmax(1) == labels).mean() > 0.8  # the champion is a real model

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent  # `mlflow` and the `uvicorn` it starts live here
    env = clean_env(MLFLOW_TRACKING_URI=store.uri,
                    PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", CHAMPION, "--env-manager",
             "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(url, server, log)
        request = urllib.request.Request(
            f"{url}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.asarray(json.load(response)["predictions"], dtype=np.float32)
    finally:
        stop_group(server)
    assert served.shape == pyfunc_scores.shape
    np.testing.assert_allclose(served, pyfunc_scores, atol=1e-5)


@pytest.mark.parametrize("installed", [True, False], ids=["pip-installed", "source-checkout"])
def test_a_logged_model_names_the_packages_that_load_it(tmp_path, monkeypatch, installed):
    """requirements.txt holds torch, timm and fractal-mlops at the versions that trained it,
    also from a checkout that pip has not installed (PYTHONPATH, as on a GPU machine that
    runs benchmarks/ from a copy of the tree): there the package's own __version__."""
    import importlib.metadata

    import mlflow
    import torch
    from helpers import Store

    import fractal_mlops
    from fractal_mlops.tracking.tracker import Tracker, configure

    if not installed:
        real = importlib.metadata.version

        def version(name: str) -> str:
            if name == "fractal-mlops":
                raise importlib.metadata.PackageNotFoundError(name)
            return real(name)

        monkeypatch.setattr(importlib.metadata, "version", version)
    store = Store(tmp_path)
    configure(store.uri)  # as each command's main does
    tracker = Tracker(store.uri, "requirements")
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    model_uri = tracker.log_model(run_id, model, (1, 8, 8), 10)
    folder = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model"))
    lines = Path(folder, "requirements.txt").read_text().split()
    assert f"torch=={importlib.metadata.distribution('torch').version}" in lines
    assert f"timm=={importlib.metadata.distribution('timm').version}" in lines
    assert f"fractal-mlops=={fractal_mlops.__version__}" in lines
