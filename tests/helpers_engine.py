"""Shared helpers for the core-engine tests (space, model, data, train)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def run_module(module: str, *args: str, cwd: Path | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m <module> args...` in a fresh interpreter, as a user would run it."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


def write_config(directory: Path, sections: dict, name: str = "experiment.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


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
