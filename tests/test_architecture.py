"""The package's folders are its architecture: every import (module level, inside a function or
under TYPE_CHECKING alike) goes down the layers or stays inside its own subpackage, so there is
no import cycle and no function-local import that dodges one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fractal_mlops"

# Lower first. A module may import its own subpackage and anything on a lower layer.
LAYERS = [
    {"fractal_mlops", "fractal_mlops.errors"},
    {"fractal_mlops.signals", "fractal_mlops.config"},
    {"fractal_mlops.engine", "fractal_mlops.stores"},
    {"fractal_mlops.tracking"},
    {"fractal_mlops.search", "fractal_mlops.reporting"},
    {"fractal_mlops.cli"},
    {"fractal_mlops.study", "fractal_mlops.space", "fractal_mlops.promote",
     "fractal_mlops.report", "fractal_mlops.reproduce", "fractal_mlops.__main__"},
]
COMMANDS = ("study", "space", "promote", "report", "reproduce")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer(name: str) -> tuple[int, str]:
    """(rank, owner): the module's layer and its subpackage (or itself, at the top level)."""
    for rank, group in enumerate(LAYERS):
        for owner in group:
            if name == owner or (owner != "fractal_mlops" and name.startswith(owner + ".")):
                return rank, owner
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_import_goes_down_a_layer_or_stays_in_its_subpackage():
    wrong = []
    for name, targets in graph().items():
        rank, owner = layer(name)
        for target in targets:
            target_rank, target_owner = layer(target)
            if target_owner != owner and target_rank >= rank:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node] - {"fractal_mlops"}:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_top_level_holds_the_commands_and_a_few_shared_modules():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {"__init__", "__main__", "cli", "errors", "signals", *COMMANDS}
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == {
        "config", "engine", "stores", "tracking", "search", "reporting"}


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_is_thin(command: str):
    lines = (PACKAGE / f"{command}.py").read_text().splitlines()
    assert len(lines) < 150, f"{command}.py has {len(lines)} lines: its work belongs in a subpackage"


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path: Path):
    """The two checks above would pass on anything if `imports` found nothing."""
    edges = graph()
    assert "fractal_mlops.errors" in edges["fractal_mlops.cli"]
    assert "fractal_mlops.search.settings" in edges["fractal_mlops.search.trial"]
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from fractal_mlops.study import main\n")
    assert imports("fractal_mlops.engine.train", fake, set(edges)) == {"fractal_mlops.study"}
