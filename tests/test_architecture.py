"""The shape of the code, checked: how the modules of autopar/ and solvers/ may import each other,
and how long a library file may grow (docs/architecture.md says why).

- no import cycle among the project's modules (imports inside functions count too);
- no module imports another module's private (underscore) name;
- planning (`autopar.planning`) never imports the runtime (`autopar.runtime`), and solvers/
  imports neither torch nor autopar;
- no library file over 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("autopar", "solvers")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every absolute import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.extend((node.module, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((a.name, None) for a in node.names)
    return out


def _project_edges(name: str) -> set[str]:
    """The project modules `name` imports (`from autopar import plan` imports autopar.plan)."""
    edges = set()
    for module, imported in _imports(MODULES[name]):
        full = f"{module}.{imported}" if imported else module
        target = full if full in MODULES else module
        if target in MODULES and target != name:
            edges.add(target)
    return edges


def test_the_checks_see_the_whole_library():
    assert {"autopar.api", "autopar.planning.search", "autopar.runtime.pipeline",
            "solvers.intra_op"} <= set(MODULES)
    assert "autopar.parallelism" in _project_edges("autopar.planning.layer_costs")


def test_no_import_cycle():
    graph = {name: _project_edges(name) for name in MODULES}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(u: str) -> None:
        state[u] = "open"
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(v):] + [v]))
            if v not in state:
                visit(v)
        path.pop()
        state[u] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_module_imports_a_private_name_of_another():
    private = [f"{name}: from {module} import {imported}"
               for name, path in MODULES.items()
               for module, imported in _imports(path)
               if module.split(".")[0] in PACKAGES and imported and imported.startswith("_")]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_planning_never_imports_the_runtime():
    wrong = [f"{name} imports {target}" for name in MODULES if name.startswith("autopar.planning")
             for target in _project_edges(name) if target.startswith("autopar.runtime")]
    assert not wrong, "\n".join(wrong)


def test_solvers_import_neither_torch_nor_autopar():
    wrong = [f"{name} imports {module}" for name in MODULES if name.startswith("solvers")
             for module, _ in _imports(MODULES[name]) if module.split(".")[0] in ("torch",
                                                                                   "autopar")]
    assert not wrong, "\n".join(wrong)


def test_no_library_file_over_600_lines():
    long = {str(path.relative_to(ROOT)): n for path in MODULES.values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
