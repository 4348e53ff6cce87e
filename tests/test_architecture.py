"""The house rules, checked on the source: import direction between parts, no private names across
modules, short functions, comments that explain code (not its history), a public API that imports."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import hpr_peft
from support import REPO_ROOT

PACKAGE = REPO_ROOT / "hpr_peft"
SOURCES = sorted(PACKAGE.rglob("*.py"))

# part -> the parts it may import (itself always allowed). rotation and runtime stand alone.
ALLOWED = {
    "rotation": set(),
    "runtime": set(),
    "tuner": {"rotation", "runtime"},
    "data": {"runtime"},
    "fitting": {"rotation", "runtime", "tuner", "data"},
    "evaluation": {"rotation", "runtime", "tuner", "data"},
    "hub": {"runtime", "tuner"},
    "integrations": {"runtime", "tuner"},
    "experiment": {"rotation", "runtime", "tuner", "data", "fitting", "evaluation", "hub"},
    "cli": {
        "rotation",
        "runtime",
        "tuner",
        "data",
        "fitting",
        "evaluation",
        "hub",
        "experiment",
        "integrations",
        "package",
    },
    "package": {"tuner", "cli"},
}
MAX_FUNCTION_LINES = 80
HISTORY_WORDS = re.compile(r"DESIGN(\.md)?\s*§|issue\s*#\d|\bcolleague", re.IGNORECASE)


def part_of(module: str) -> str:
    """``hpr_peft.fitting.fit`` -> ``fitting``; ``hpr_peft`` / ``hpr_peft.__main__`` -> ``package``."""
    pieces = module.split(".")
    if len(pieces) == 1 or pieces[1] in ("__init__", "__main__"):
        return "package"
    return pieces[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported hpr_peft module, imported names, line)`` for every import of our own code."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpr_peft"):
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("hpr_peft")]
    return out


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path):
    source_part = part_of(module_name(path))
    for module, names, line in imports_of(path):
        target = part_of(module)
        if target == "package" and names:  # `from hpr_peft import fitting` names a part
            targets = {n if n in ALLOWED else "package" for n in names}
        else:
            targets = {target}
        for target in targets - {source_part}:
            assert target in ALLOWED[source_part], (
                f"{path}:{line}: part {source_part!r} imports {module} ({target!r}); allowed: "
                f"{sorted(ALLOWED[source_part])}"
            )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_across_modules(path):
    own = module_name(path)
    for module, names, line in imports_of(path):
        private = [n for n in names if n.startswith("_") and module != own]
        assert not private, (
            f"{path}:{line}: imports private {private} from {module}; make it public or move it"
        )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_short(path):
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            justified = first >= 2 and "must be long" in lines[first - 2]
            assert length <= MAX_FUNCTION_LINES or justified, (
                f"{path}:{node.lineno} {node.name} has {length} lines (at most {MAX_FUNCTION_LINES}, or a "
                "comment right above saying why it must be long)"
            )


@pytest.mark.parametrize(
    "path",
    [
        *SOURCES,
        *sorted((REPO_ROOT / "tests").rglob("*.py")),
        *sorted((REPO_ROOT / "benchmarks").rglob("*.py")),
    ],
    ids=lambda p: str(p.relative_to(REPO_ROOT)),
)
def test_comments_explain_code_not_its_history(path):
    if path.name == "test_architecture.py":
        return
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        assert not HISTORY_WORDS.search(line), (
            f"{path}:{number} cites a design doc, an issue or a person: {line!r}"
        )


@pytest.mark.parametrize("name", hpr_peft.__all__)
def test_every_public_name_imports(name):
    assert getattr(hpr_peft, name) is not None


@pytest.mark.parametrize("part", sorted(set(ALLOWED) - {"package"}))
def test_every_part_imports_alone(part):
    module = importlib.import_module(f"hpr_peft.{part}")
    for name in getattr(module, "__all__", []):
        assert hasattr(module, name), f"hpr_peft.{part}.__all__ lists {name!r}, which it does not define"
