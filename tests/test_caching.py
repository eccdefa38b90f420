"""Cache keys follow the code a stage runs: an edit re-runs the stages that run it and those after them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tasks.caching import code_fingerprint, library_versions, module_closure

REPO = Path(__file__).resolve().parent.parent

RUN_SMOKE = """
import asyncio, json, sys
from flows.config import load_config
from flows.preference_tuning import preference_tuning
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

async def states(flow_run_id):
    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}

config = load_config("smoke", overrides=sys.argv[1:])
state = preference_tuning(config, return_state=True)
assert state.is_completed(), state
print("STATES", json.dumps(asyncio.run(states(state.state_details.flow_run_id))))
"""


def test_a_stage_key_covers_the_project_modules_it_runs():
    names = {path.name for path in module_closure("tasks.data")}
    assert {"data.py", "base.py", "synthetic.py"} <= names and "evaluate.py" not in names
    training = {path.name for path in module_closure("tasks.policy")}
    assert {"policy.py", "methods.py", "training.py", "plan.py", "data.py"} <= training and "evaluate.py" not in training
    assert code_fingerprint("tasks.data") != code_fingerprint("tasks.policy")
    assert "trl=" in library_versions() and "torch=" in library_versions()


def _run(project: Path, tmp_path: Path) -> dict[str, str]:
    env = os.environ | {"PYTHONPATH": str(project), "PREFECT_HOME": str(tmp_path / "prefect")}
    result = subprocess.run([sys.executable, "-c", RUN_SMOKE, f"runs_dir={tmp_path / 'runs'}",
                             f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("STATES "))
    return json.loads(line.removeprefix("STATES "))


def _state(states: dict[str, str], stage: str) -> str:
    """A task run's state by its stage name ("filter-data"), or by its task name ("train-dpo-1a2")."""
    if stage in states:
        return states[stage]
    [state] = [value for name, value in states.items()
               if name.startswith(stage + "-") and "-" not in name[len(stage) + 1:]]
    return state


def _edit(path: Path, function: str) -> None:
    """A change to a helper's body (what a bug fix is), not to any task."""
    source = path.read_text()
    marker = f"def {function}("
    start = source.index(marker)
    body = source.index('"""', source.index('"""', start) + 3) + 3  # after the docstring
    path.write_text(source[:body] + "\n    _edited = True  # a code change" + source[body:])


def test_editing_a_helper_reruns_its_stage_and_what_follows_only(tmp_path):
    project = tmp_path / "project"
    for folder in ("flows", "tasks", "configs"):
        shutil.copytree(REPO / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))

    first = _run(project, tmp_path)
    assert _state(first, "train-dpo") == "Completed"
    _edit(project / "tasks" / "evaluate.py", "sample_prompts")  # an evaluation helper
    after_evaluation_fix = _run(project, tmp_path)
    for stage in ("filter-data", "split-data", "format-data", "reward-helpfulness", "train-sft", "train-dpo",
                  "merge-adapters"):
        assert _state(after_evaluation_fix, stage) == "Cached", (stage, after_evaluation_fix)
    assert _state(after_evaluation_fix, "evaluate") == "Completed"

    _edit(project / "tasks" / "data.py", "apply_filter")  # the filter's helper
    after_filter_fix = _run(project, tmp_path)
    for stage in ("filter-data", "split-data", "format-data", "reward-helpfulness", "train-dpo", "merge-adapters",
                  "evaluate"):
        assert _state(after_filter_fix, stage) == "Completed", (stage, after_filter_fix)
    assert _state(after_filter_fix, "load-data") == "Completed"  # upstream: never cached (its source may change)
