"""The environment is the locked one, and every package the code imports is declared."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def locked() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", (REPO / "requirements.lock").read_text(), re.M)
    return {_name(name): pinned for name, pinned in pins}


def test_installed_versions_are_the_locked_ones():
    mismatched = {name: (pinned, version(name)) for name, pinned in locked().items() if version(name) != pinned}
    assert not mismatched


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {
        _name(re.split(r"[<>=\[; ]", spec)[0])
        for spec in project["dependencies"] + project["optional-dependencies"]["dev"]
    }
    providers = packages_distributions()
    own = {"flows", "tasks"} | {
        path.stem for path in [*REPO.glob("tests/*.py"), *REPO.glob("bench/*.py")]
    }  # and helpers
    imported = set()
    for path in [
        *REPO.glob("flows/*.py"),
        *REPO.glob("tasks/*.py"),
        *REPO.glob("bench/*.py"),
        *REPO.glob("tests/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = {module for module in imported - own if module not in sys.stdlib_module_names}
    undeclared = {
        module: providers.get(module)
        for module in third_party
        if not {_name(d) for d in providers.get(module, [module])} & declared
    }
    assert not undeclared
