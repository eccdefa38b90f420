"""Cache keys that change exactly when a stage's result would.

Prefect's `TASK_SOURCE` hashes only the decorated function, here a two-line wrapper: a fix in a helper
it calls would silently reuse results of the old code. A stage's key is instead made of its inputs,
the source of its module and of every project module that module imports (transitively), the versions
of the libraries that compute the result, and, for training, the precision and quantization the plan
chose. That key names the stage's folder too. Recording into MLflow is a step of its own, keyed on the
tracking store, so a new store gets the runs again without training anything again.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext

from tasks.base import Workspace, fingerprint

PROJECT_PACKAGES = ("tasks",)
LIBRARIES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "pandas",
    "lm-eval",
    "nltk",
    "langdetect",
)


def _imported_modules(path: Path) -> set[str]:
    """Project modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name.split(".")[0] in PROJECT_PACKAGES}
    return found


def _source_file(module: str) -> Path | None:
    """The module's file; None for names that are not modules (`from tasks.data import read_jsonl`)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def module_closure(module: str) -> list[Path]:
    """The source files of `module` and of the project modules it imports, transitively."""
    seen: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        path = _source_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        pending += sorted(_imported_modules(path) - seen.keys())
    return sorted(set(seen.values()))


def code_fingerprint(module: str) -> str:
    """Hash of the source a stage runs, read from disk on every call (an edit changes it at once)."""
    digest = hashlib.sha256()
    for path in module_closure(module):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def library_versions() -> str:
    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return ",".join(f"{name}={installed(name)}" for name in LIBRARIES)


def _workspace(parameters: dict) -> Workspace | None:
    """The run's workspace among a task's inputs: given as such, or in its run context."""
    run = parameters.get("run")
    return run.workspace if run is not None else parameters.get("workspace")


def stage_key(task, parameters: dict, links: tuple[str, ...] = ()) -> str:
    """A stage's key: its inputs (the run's folder, not its MLflow run or launcher settings), the parts
    of its training plan that change the weights (precision, quantization; not micro-batch or
    checkpointing, which follow the free memory), its code and the libraries. It names the stage's
    folder and is its Prefect cache key: one answer to "is this stage done?". `links`: inputs that only
    point somewhere (MLflow run ids) and change no result."""
    inputs = {name: value for name, value in parameters.items() if name not in ("run", "plan", "workspace", *links)}
    workspace, plan = _workspace(parameters), parameters.get("plan")
    return fingerprint(
        [
            task.name,
            inputs,
            workspace.path if workspace else None,
            plan.result_key() if plan else None,
            code_fingerprint(task.fn.__module__),
            library_versions(),
        ]
    )


def stage_folder(workspace: Workspace, stage: str, links: tuple[str, ...] = ()) -> Path:
    """The running stage task's folder, `<run>/<stage>/<key>`: named by the key Prefect caches the task's
    result under, so the folder and the cache agree on what is done."""
    context = TaskRunContext.get()
    return Path(workspace.path) / stage / stage_key(context.task, context.parameters, links)


def _tracking_store(context, parameters) -> str:
    return hashlib.sha256(mlflow.get_tracking_uri().encode()).hexdigest()[:16]


def stage_cache(links: tuple[str, ...] = ()) -> CacheKeyFnPolicy:
    """The stage key, and the run folder's generation: a token made with the folder and renewed by
    `preftune gc`, so no cached result outlives the folders it names."""

    def key(context, parameters) -> str:
        workspace = _workspace(parameters)
        return stage_key(context.task, parameters, links) + (f"|{workspace.token}" if workspace else "")

    return CacheKeyFnPolicy(cache_key_fn=key)


TRACKING_STORE = CacheKeyFnPolicy(cache_key_fn=_tracking_store)
# Data, training and merging: the stage's key, which also names its folder.
STAGE_CACHE = stage_cache()
# Recording a finished stage into MLflow: the recording's own key (the stage's result, its code) and the
# tracking store (a new store records it again).
RECORD_CACHE = STAGE_CACHE + TRACKING_STORE
# Evaluation, which records into MLflow as it goes: the stage's key (not the run ids it links to) and the store.
EVALUATION_CACHE = TRACKING_STORE + stage_cache(links=("stage_runs",))
