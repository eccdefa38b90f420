"""The training path runs downhill: no module of `tasks/` imports, at any depth or inside a function,
a module that imports it back, and the launched rank's entry point is imported by nobody."""
from __future__ import annotations

import ast
from pathlib import Path

from graphlib import CycleError, TopologicalSorter

TASKS = Path(__file__).resolve().parent.parent / "tasks"


def imports_of(path: Path) -> set[str]:
    """Every `tasks.*` module a file imports, wherever in the file the import is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tasks":
                found |= {f"tasks.{alias.name}" for alias in node.names}
            elif node.module.startswith("tasks."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("tasks.")}
    return found


def graph() -> dict[str, set[str]]:
    return {f"tasks.{path.stem}": imports_of(path) for path in TASKS.glob("*.py") if path.stem != "__init__"}


def test_no_import_cycle_among_tasks_modules():
    try:
        order = list(TopologicalSorter(graph()).static_order())
    except CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None
    assert order.index("tasks.distributed") < order.index("tasks.plan") < order.index("tasks.training")


def test_the_launched_rank_is_an_entry_point_only():
    importers = [module for module, imported in graph().items() if "tasks.rank" in imported]
    assert importers == []
    assert "tasks.training" in graph()["tasks.rank"] and "tasks.rank" not in graph()["tasks.launcher"]


def test_the_check_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tasks.training import fit\n    import tasks.plan\n")
    assert imports_of(module) == {"tasks.training", "tasks.plan"}
