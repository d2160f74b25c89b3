"""The wheels an offline GPU machine lacks to run benchmarks/ from a copy of this checkout.

A GPU machine without a route to a package index (a batch node, a lent cloud box) often has
torch, torchvision and timm but neither MLflow nor Optuna. This walks fractal-mlops'
dependencies as installed here, leaves out what that machine already has (--have: a file of
package names), and downloads the rest at the versions installed here (the ones the suite
tested), without their own dependencies, as wheels for that machine's Python into --dest.
With them go a few small pure-Python packages the machine has, at the versions here too
(--also): what the carried ones need newer than an image may hold (pydantic needs
typing-extensions >= 4.16, databricks-sdk certifi >= 2026.10); installed ahead of the
machine's own on PYTHONPATH, they shadow them for these scripts only.

    python benchmarks/gpu_wheels.py [--have benchmarks/gpu_machine.txt] [--python 3.12]

Then carry the folder to the machine: benchmarks/gpu_session.sh installs it there with
`pip install --no-index --no-deps --target`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def machine_packages(path: Path) -> set[str]:
    """Package names in a file: separated by spaces, commas or lines; '#' starts a comment."""
    words = re.split(r"[\s,]+", re.sub(r"#.*", "", path.read_text()))
    return {canonical(w) for w in words if w}


def missing(root: str, have: set[str], python: str) -> dict[str, str]:
    """{name: version installed here} of what `root` needs, transitively, that `have` lacks."""
    environment = {**default_environment(), "python_version": python,
                   "python_full_version": f"{python}.0"}
    needed: dict[str, str] = {}
    todo = [Requirement(root)]
    while todo:
        requirement = todo.pop()
        name = canonical(requirement.name)
        if name in have or (name in needed and not requirement.extras):
            continue
        dist = metadata.distribution(name)
        if name != canonical(root):
            needed[name] = dist.version
        for text in dist.requires or []:
            nested = Requirement(text)
            extras = [""] + sorted(requirement.extras)
            if nested.marker is None or any(
                    nested.marker.evaluate({**environment, "extra": e}) for e in extras):
                todo.append(nested)
    return needed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--have", type=Path, default=HERE / "gpu_machine.txt",
                        help="the machine's package names (default: benchmarks/gpu_machine.txt)")
    parser.add_argument("--python", default="3.12", help="the machine's Python (default 3.12)")
    parser.add_argument("--also", nargs="*", default=["typing-extensions", "certifi"],
                        help="packages the machine has to carry anyway, at the versions here "
                        "(default: typing-extensions certifi)")
    parser.add_argument("--dest", type=Path, default=HERE.parent / ".whl")
    args = parser.parse_args(argv)
    needed = missing("fractal-mlops", machine_packages(args.have), args.python)
    needed.update({canonical(name): metadata.version(name) for name in args.also})
    args.dest.mkdir(parents=True, exist_ok=True)
    version = args.python.replace(".", "")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--python-version", args.python, "--implementation", "cp",
               "--abi", f"cp{version}", "--abi", "abi3", "--abi", "none", "-d", str(args.dest),
               *(f"--platform={p}" for p in PLATFORMS + ["any"]),
               *(f"{name}=={v}" for name, v in sorted(needed.items()))]
    done = subprocess.run(command)
    if done.returncode != 0:
        return done.returncode
    size = sum(f.stat().st_size for f in args.dest.glob("*.whl")) / 2**20
    print(f"{len(needed)} packages ({len(args.also)} of them shadowing the machine's), {size:.0f} "
          f"MiB of wheels in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
