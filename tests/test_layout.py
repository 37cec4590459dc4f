"""The repo's layout: every module imports alone, the import graph is a tree, each says what it holds."""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest

import options
from conftest import REPO

SCRIPTS = sorted(p.stem for p in REPO.glob("*.py") if options.is_script(p))  # the OPTIONS marker opens a line
MODULES = sorted(p.stem for p in REPO.glob("*.py") if p.stem not in SCRIPTS)


def local_imports(name: str) -> set:
    """The repo modules a file imports (at any depth of the file: function-level imports count too)."""
    tree = ast.parse((REPO / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_import_graph_has_no_cycle_and_modules_import_alone():
    graph = {m: local_imports(m) for m in MODULES}
    assert not graph["encoding"] and not graph["pca"], "encoding.py and pca.py depend on nothing else in the repo"
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "active", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "active"
        for dep in graph[node]:
            visit(dep, path + [node])
        state[node] = "done"
    for module in MODULES:
        visit(module, [])
    # each module in a fresh interpreter (so no import order hides a missing import), all at once
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for m in MODULES}
    for module, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{module}: {err[-500:]}"


@pytest.mark.parametrize("name", MODULES + SCRIPTS)
def test_every_file_says_what_it_holds_and_stays_readable(name):
    text = (REPO / f"{name}.py").read_text()
    assert ast.get_docstring(ast.parse(text)), f"{name}.py has no module docstring"
    assert len(text.splitlines()) <= 500, f"{name}.py: {len(text.splitlines())} lines (500 at most)"
