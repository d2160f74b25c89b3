"""A stop signal in the middle of promote (issue 26): one line, exit 128 + N, and the registry
is never left half-written: a version that promote registered holds its alias."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, alias_version, clean_env, mlflow_client, versions


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_while_promote_registers_leaves_a_version_with_its_alias(store, signum):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fractal_mlops.promote", "--experiment", "registry-tiny",
         "--tracking-uri", store.uri], cwd=REPO, env=clean_env(PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell
    try:                                                                  # may ignore SIGINT
        deadline = time.monotonic() + 300
        for line in proc.stdout:  # the line promote prints just before it registers
            if line.startswith("best by") or time.monotonic() > deadline:
                break
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert "Traceback" not in err, err
    assert proc.returncode == 128 + signum, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"interrupted ({signal.Signals(signum).name})" in lines[0], lines
    client = mlflow_client(store.uri)
    registered = versions(client)
    if registered:  # the signal waited for the registration: it holds the alias
        assert alias_version(client, "champion") == registered[-1].version
