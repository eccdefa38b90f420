"""Cache keys follow the code a stage runs: an edit re-runs the stages that run it and those after them.

The keys are compared directly: a copy of the project is edited, and a subprocess that imports that copy
asks each stage's own Prefect cache policy for its key, on the same inputs. That a key found again is
really reused (the task run is `Cached`) is tests/test_flow.py's `test_rerun_reuses_finished_stages`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import types
import uuid
from pathlib import Path

import mlflow
import pytest

from tasks.base import Workspace
from tasks.caching import code_fingerprint, library_versions, module_closure
from tasks.data import load_preferences
from tasks.models import ModelSettings, RandomInitSettings, ResolvedModel
from tasks.plan import TrainingPlan, default_plan
from tasks.settings.data import DataSettings
from tasks.settings.training import PolicySettings

REPO = Path(__file__).resolve().parent.parent
# The cached stages of the pipeline, in order, by the task that runs each.
STAGES = {
    "filter": "tasks.data:filter_preferences",
    "split": "tasks.data:split_preferences",
    "format": "tasks.data:format_preferences",
    "reward": "tasks.reward:train_reward",
    "sft": "tasks.sft:train_sft",
    "policy": "tasks.policy:train_policy",
    "merge": "tasks.merge:merge_adapters",
    "evaluate": "tasks.evaluate:evaluate",
}
STORE = "sqlite:///never-opened.db"  # the tracking store evaluation keys on (only its URI is read)

INPUTS = {"a": {"settings": {"value": "a"}}, "b": {"settings": {"value": "b"}}}  # the same inputs, another setting
TRAINING = ["reward", "sft", "policy"]  # these also get a training plan

KEYS = """
import importlib, json, sys, types
from pathlib import Path

trees, stages, inputs, training, plan = (json.loads(argument) for argument in sys.argv[1:])
keys = {}
for tree, folder in trees.items():  # each copy of the project in turn, in place of the last one
    for name in [name for name in sys.modules if name.split(".")[0] == "tasks"]:
        del sys.modules[name]
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    import tasks
    from tasks.plan import TrainingPlan
    assert Path(tasks.__file__).is_relative_to(folder), tasks.__file__  # the copy, not the checkout
    keys[tree] = {}
    for stage, target in stages.items():
        module, name = target.split(":")
        task = getattr(importlib.import_module(module), name)
        for setting, values in inputs.items():
            # What a task run's context gives a cache policy: the task (CODE reads its function's module).
            given = values | ({"plan": TrainingPlan.model_validate(plan)} if stage in training else {})
            context = types.SimpleNamespace(task=task)
            keys[tree][f"{stage}/{setting}"] = task.cache_policy.compute_key(context, given, {})
    sys.path.remove(folder)
print("KEYS " + json.dumps(keys))
"""
# A change to one helper's body (what a bug fix is), not to any task: file and function.
EDITS = {
    "evaluation": ("evaluate", "sample_prompts"),
    "filter": ("data", "apply_filter"),
    "training": ("training", "numeric"),
}


def test_a_stage_key_covers_the_project_modules_it_runs():
    names = {path.name for path in module_closure("tasks.data")}
    assert {"data.py", "base.py", "synthetic.py"} <= names and "evaluate.py" not in names
    training = {path.name for path in module_closure("tasks.policy")}
    assert {
        "policy.py",
        "methods.py",
        "training.py",
        "plan.py",
        "data.py",
    } <= training and "evaluate.py" not in training
    assert code_fingerprint("tasks.data") != code_fingerprint("tasks.policy")
    assert "trl=" in library_versions() and "torch=" in library_versions()


def test_loading_is_never_reused_across_flow_runs(tmp_path):
    """A data file or hub dataset may change under the same name: its load keys on the flow run."""
    inputs = {"settings": DataSettings(), "workspace": Workspace.open(tmp_path), "stage": "data"}

    def key(flow_run_id: uuid.UUID) -> str:
        context = types.SimpleNamespace(task=load_preferences, task_run=types.SimpleNamespace(flow_run_id=flow_run_id))
        return load_preferences.cache_policy.compute_key(context, inputs, {})

    one, other = uuid.uuid4(), uuid.uuid4()
    assert key(one) == key(one) and key(one) != key(other)


def _edit(path: Path, function: str) -> None:
    """A line added to the function's body, after its docstring."""
    source = path.read_text()
    start = source.index(f"def {function}(")
    body = source.index('"""', source.index('"""', start) + 3) + 3  # after the docstring
    path.write_text(source[:body] + "\n    _edited = True  # a code change" + source[body:])


@pytest.fixture(scope="module")
def plan(tiny_model_path) -> dict:
    """One plan for every key (a new one may differ: its memory budget follows the free memory)."""
    return default_plan(
        "dpo",
        "dpo",
        PolicySettings(),
        ResolvedModel(path=tiny_model_path, settings=ModelSettings(random_init=RandomInitSettings())),
    ).model_dump(mode="json")


@pytest.fixture(scope="module")
def keys(tmp_path_factory, plan) -> dict[str, dict[str, str]]:
    """Each stage's cache key in an unchanged copy of the project and in one copy per edit, computed by
    one subprocess that imports each copy in turn."""
    root = tmp_path_factory.mktemp("caching")
    trees = {}
    for tree in ("unchanged", *EDITS):
        trees[tree] = root / tree
        shutil.copytree(REPO / "tasks", trees[tree] / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
        if tree in EDITS:
            module, helper = EDITS[tree]
            _edit(trees[tree] / "tasks" / f"{module}.py", helper)
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"} | {"MLFLOW_TRACKING_URI": STORE}
    arguments = ({tree: str(folder) for tree, folder in trees.items()}, STAGES, INPUTS, TRAINING, plan)
    result = subprocess.run(
        [sys.executable, "-c", KEYS, *map(json.dumps, arguments)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(
        next(line for line in result.stdout.splitlines() if line.startswith("KEYS ")).removeprefix("KEYS ")
    )


def _changed(before: dict[str, str], after: dict[str, str], setting: str) -> set[str]:
    return {stage for stage in STAGES if before[f"{stage}/{setting}"] != after[f"{stage}/{setting}"]}


def test_keys_are_stable_across_processes_and_follow_the_inputs(keys, plan):
    """The checkout's keys, here, equal its copy's in another process (else nothing would ever be reused)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(STORE)
    try:
        here = {}
        for stage, target in STAGES.items():
            module, name = target.split(":")
            task = getattr(importlib.import_module(module), name)
            for setting, values in INPUTS.items():
                given = values | ({"plan": TrainingPlan.model_validate(plan)} if stage in TRAINING else {})
                here[f"{stage}/{setting}"] = task.cache_policy.compute_key(types.SimpleNamespace(task=task), given, {})
    finally:
        mlflow.set_tracking_uri(previous)
    assert here == keys["unchanged"] and all(here.values())
    assert _changed(keys["unchanged"], {f"{stage}/a": here[f"{stage}/b"] for stage in STAGES}, "a") == set(STAGES)


def test_only_what_records_into_mlflow_keys_on_the_tracking_store(plan):
    """A new store re-records (the recording step) and re-evaluates (it records as it goes); no data,
    training or merge stage runs again for it."""
    keys = {}
    previous = mlflow.get_tracking_uri()
    try:
        for store in ("sqlite:///one.db", "sqlite:///two.db"):
            mlflow.set_tracking_uri(store)
            for stage, target in (STAGES | {"record": "tasks.recording:record_stage"}).items():
                module, name = target.split(":")
                task = getattr(importlib.import_module(module), name)
                given = INPUTS["a"] | ({"plan": TrainingPlan.model_validate(plan)} if stage in TRAINING else {})
                keys[store, stage] = task.cache_policy.compute_key(types.SimpleNamespace(task=task), given, {})
    finally:
        mlflow.set_tracking_uri(previous)
    moved = {
        stage
        for store, stage in keys
        if store == "sqlite:///one.db" and keys[store, stage] != keys["sqlite:///two.db", stage]
    }
    assert moved == {"evaluate", "record"}


DATA = {"filter", "split", "format"}


@pytest.mark.parametrize(
    "edit, runs_again, reused",
    [
        ("evaluation", {"evaluate"}, set(STAGES) - {"evaluate"}),  # the last stage's helper: nothing before it
        ("filter", set(STAGES), set()),  # the filter's helper: the filter and everything after it
        ("training", {"reward", "sft", "policy"}, DATA),  # the trainers' shared helper: not the data stages
    ],
)
def test_editing_a_helper_changes_the_keys_of_its_stage_and_what_follows_only(keys, edit, runs_again, reused):
    for setting in INPUTS:  # whatever the inputs
        changed = _changed(keys["unchanged"], keys[edit], setting)
        assert runs_again <= changed and not changed & reused, (edit, changed)
