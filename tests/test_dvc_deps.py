"""Every DVC stage depends on every module of the package it executes, derived from the
imports: the `noisy-student` command's module-level imports, the imports of the branch of
`main` that runs the stage's subcommand, and everything those import in turn. A module
added to that closure without a dvc.yaml dep fails here, naming the stage and the file."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
CLI = "noisy_student.cli"


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` in this repository, or None (third party)."""
    path = SRC.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imported(node: ast.AST, module: str) -> set[str]:
    """Modules an ``import`` statement executes: the named ones and their packages."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.rsplit(".", node.level)[0]
            base = f"{package}.{base}" if base else package
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if module_file(prefix) is not None:
                found.add(prefix)
    return found


def _tree(module: str) -> ast.Module:
    path = module_file(module)
    assert path is not None, module
    return ast.parse(path.read_text(encoding="utf-8"))


def closure(roots: set[str]) -> set[str]:
    """``roots`` and every module their code imports, at any depth (an import inside a
    function counts: nothing tells whether the function runs). The CLI's own imports are
    the roots (``cli_roots``): only those of the subcommand that runs."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module == CLI:
            continue
        for node in ast.walk(_tree(module)):
            todo.extend(_imported(node, module) - seen)
    return seen


def _commands(test: ast.expr) -> set[str]:
    """The subcommands an ``if args.command == "x"`` / ``in ("x", "y")`` test selects."""
    if not (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Attribute)
        and test.left.attr == "command"
    ):
        return set()
    return {
        node.value
        for node in ast.walk(test.comparators[0])
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def cli_roots(command: str) -> set[str]:
    """What the CLI imports to run ``command``: its module-level imports and those in the
    branches of ``main`` that handle ``command``."""
    tree = _tree(CLI)
    roots = {CLI}
    for statement in tree.body:
        if not isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
            for node in ast.walk(statement):
                roots |= _imported(node, CLI)
    [main] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    for node in ast.walk(main):
        if isinstance(node, ast.If) and command in _commands(node.test):
            for statement in node.body:
                for inner in ast.walk(statement):
                    roots |= _imported(inner, CLI)
    return roots


def stage_command(cmd: str) -> str:
    """``noisy-student train --iteration 0`` -> ``train``."""
    words = shlex.split(cmd)
    assert words[0] == "noisy-student", cmd
    return next(word for word in words[1:] if not word.startswith("-"))


def executed_files(command: str) -> set[str]:
    return {
        module_file(module).relative_to(REPO).as_posix() for module in closure(cli_roots(command))
    }


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_every_stage_depends_on_the_modules_it_executes() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        deps = [str(dep) for dep in body["deps"]]
        lacking = sorted(
            path for path in executed_files(stage_command(body["cmd"])) if not covered(path, deps)
        )
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml stages miss deps on the code they run: {missing}"


def test_the_derivation_sees_lazy_imports() -> None:
    """The report branch imports tracking inside ``main``."""
    assert "src/noisy_student/tracking.py" in executed_files("report")
    assert "src/noisy_student/pipeline.py" in executed_files("train")
    assert "src/noisy_student/engine.py" in executed_files("pseudo-label")
    assert "src/noisy_student/data/splits.py" in executed_files("prepare")
    assert not covered("src/noisy_student/engine.py", ["src/noisy_student/data"])
