"""The apps depend on each other one way (``make check`` runs import-linter's ``layers`` contract in
pyproject.toml), and no import across apps hides inside a function, where a reader would miss it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APPS = ("finetune_platform", "usage", "deployments", "tasks", "gpus", "accounts", "core")


def _function_local_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and inner.module:
                found.append((inner.lineno, inner.module))
            elif isinstance(inner, ast.Import):
                found.extend((inner.lineno, alias.name) for alias in inner.names)
    return found


def test_no_function_local_import_crosses_apps() -> None:
    crossing = []
    for app in APPS:
        for path in (REPO / app).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            for line, module in _function_local_imports(path):
                target = module.split(".")[0]
                if target in APPS and target != app:
                    crossing.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert crossing == []
