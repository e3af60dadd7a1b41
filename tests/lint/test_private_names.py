"""Private names of TensorFlow, Keras and Horovod are used in one module only (hvdclip/foreign.py), and no
hvdclip module reaches into another's private members."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "hvdclip"
FOREIGN = PACKAGE / "foreign.py"
# Modules of other projects that are theirs to change: imported only by hvdclip/foreign.py.
PRIVATE_MODULES = ("keras.src", "tensorflow.python", "horovod.runner", "horovod._keras")
# Public calls whose names happen to start with an underscore.
PUBLIC_UNDERSCORED = {("os", "_exit")}  # The documented way to end a process that cannot unwind.


def _uses(path: Path) -> list[str]:
    """Each private name `path` reaches, as "line: what"."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(PRIVATE_MODULES):
                found.append(f"{node.lineno}: from {node.module} import ...")
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.startswith(PRIVATE_MODULES)]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and (base.id in ("self", "cls") or (base.id, node.attr) in PUBLIC_UNDERSCORED):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "self":
                owner = base.attr  # `self._section._arm`: a helper object of the same module's own class.
                if _defined_here(tree, node.attr):
                    continue
                found.append(f"{node.lineno}: self.{owner}.{node.attr}")
                continue
            found.append(f"{node.lineno}: {ast.unparse(base)}.{node.attr}")
    return found


def _defined_here(tree: ast.Module, name: str) -> bool:
    """Whether a class of this module defines `name` (so using it stays inside the module)."""
    return any(
        isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == name
        for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef) for item in cls.body
    )  # fmt: skip


def test_private_names_of_other_projects_are_reached_only_through_foreign():
    offenders = {
        str(path.relative_to(REPO)): uses
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != FOREIGN and (uses := _uses(path))
    }
    assert offenders == {}, "use hvdclip.foreign (add the name there, with its version check) instead: " + repr(offenders)


def test_foreign_checks_the_versions_it_was_written_for_at_import():
    tree = ast.parse(FOREIGN.read_text())
    calls = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)]
    assert any(ast.unparse(call.value.func) == "check_versions" for call in calls)
