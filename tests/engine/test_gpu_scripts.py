"""The GPU scripts of benchmarks/ on a machine without CUDA: one line, exit 0, nothing run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.parametrize("script", ["gpu_smoke.py", "bench_gpu.py"])
def test_without_cuda_the_gpu_scripts_say_so_in_one_line_and_exit_0(script, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the script would run its GPU checks")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("no CUDA device"), done.stdout
    assert len(done.stdout.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written
