"""The training path runs downhill: no module of `tasks/` imports, at any depth or inside a function,
a module that imports it back, and the launched rank's entry point is imported by nobody. Building the
settings (every profile, `preftune config`) imports no ML runtime."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

TASKS = Path(__file__).resolve().parent.parent / "tasks"
ML_RUNTIME = ("torch", "transformers", "peft", "mlflow", "trl")


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
    return {
        ".".join(("tasks", *path.relative_to(TASKS).with_suffix("").parts)): imports_of(path)
        for path in TASKS.rglob("*.py")
        if path.stem != "__init__"
    }


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


# Run in a fresh interpreter: records, for the first import of each ML runtime package, the repository
# frames that led to it (innermost last), then builds every profile and runs `preftune config`.
SETTINGS_ONLY = """
import contextlib, io, json, sys, traceback
from pathlib import Path

RUNTIME, REPO = set(json.loads(sys.argv[1])), str(Path.cwd())
importers = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in RUNTIME and top not in importers:
            importers[top] = [f"{Path(f.filename).relative_to(REPO)}:{f.lineno}" for f in traceback.extract_stack()
                              if f.filename.startswith(REPO) and "/.venv/" not in f.filename]
        return None

sys.meta_path.insert(0, Watch())
from flows.cli import main
from flows.config import load_config, profile_names

for profile in profile_names():
    load_config(profile)
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        assert main(["config", "--profile", profile]) == 0
    assert json.loads(shown.getvalue())["profile"] == profile
print(json.dumps({name: importers.get(name, []) for name in RUNTIME if name in sys.modules}))
"""


def test_building_the_settings_imports_no_ml_runtime():
    """A profile is built, checked and shown (`preftune config`, the deployment form) without torch,
    transformers, PEFT, TRL or MLflow: settings live in tasks/settings/, apart from the code that runs them."""
    done = subprocess.run(
        [sys.executable, "-c", SETTINGS_ONLY, json.dumps(ML_RUNTIME)],
        cwd=TASKS.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not loaded, "building the settings imported " + "; ".join(
        f"{name} (via {' -> '.join(chain) or 'no repository frame'})" for name, chain in sorted(loaded.items())
    )
