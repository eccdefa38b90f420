"""Cache keys that change exactly when a stage's result would.

Prefect's `TASK_SOURCE` hashes only the decorated function, here a two-line wrapper: a fix in a helper
it calls would silently reuse results of the old code. A stage's key is instead made of its inputs,
the source of its module and of every project module that module imports (transitively), the versions
of the libraries that compute the result, and, for training, the precision and quantization the plan
chose. Stages that record into MLflow also key on the tracking store, so a new store gets their runs.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
from prefect.cache_policies import INPUTS, CacheKeyFnPolicy

PROJECT_PACKAGES = ("tasks",)
LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "pandas", "lm-eval",
             "nltk", "langdetect")


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


def _code_and_libraries(context, parameters) -> str:
    return code_fingerprint(context.task.fn.__module__) + "|" + library_versions()


def _tracking_store(context, parameters) -> str:
    return hashlib.sha256(mlflow.get_tracking_uri().encode()).hexdigest()[:16]


def _plan_result_key(context, parameters) -> str:
    return "|".join(parameters["plan"].result_key())


CODE = CacheKeyFnPolicy(cache_key_fn=_code_and_libraries)
TRACKING_STORE = CacheKeyFnPolicy(cache_key_fn=_tracking_store)
# Data stages: their inputs and code.
DATA_CACHE = INPUTS + CODE
# Training: inputs (not the MLflow parent run), code, tracking store, and the parts of the training plan
# that change the weights (precision, quantization), not those that only change speed or memory
# (micro-batch, checkpointing: they follow the free memory at the time).
TRAINING_CACHE = (INPUTS - "parent_run_id" - "plan") + CODE + TRACKING_STORE + CacheKeyFnPolicy(
    cache_key_fn=_plan_result_key)
# Evaluation: inputs (not the run ids it only links to), code, tracking store.
EVALUATION_CACHE = (INPUTS - "parent_run_id" - "stage_runs") + CODE + TRACKING_STORE
# Merging: inputs and code (it records nothing in MLflow).
MERGE_CACHE = INPUTS + CODE
