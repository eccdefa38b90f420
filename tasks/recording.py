"""Recording a finished training stage into MLflow: its own step, after training.

Training writes its curves into the stage folder's record (tasks/training.py); this step opens the
stage's MLflow run under the flow's parent run and logs the plan, the curves and the metrics. Its
cache key is the stage's result and the tracking store, so a new store gets the runs again and
nothing trains again; a lost tracking server fails this step, never the training before it.
"""

from __future__ import annotations

import time

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from prefect import task

from tasks.base import retry_unless_user_error
from tasks.caching import RECORD_CACHE
from tasks.run_context import RunContext
from tasks.tracking import stage_run
from tasks.training import FitResult


def log_history(run_id: str, history: list[dict]) -> None:
    """A trainer's log history as MLflow metrics at their steps, in one batch (MLflow splits it)."""
    now = int(time.time() * 1000)
    curves = [
        Metric(key, float(value), now, int(entry["step"]))
        for entry in history
        if "step" in entry
        for key, value in entry.items()
        if isinstance(value, (int, float)) and key not in ("step", "epoch")
    ]
    MlflowClient().log_batch(run_id, metrics=curves)


def record_fit(stage: str, fitted: FitResult, parent_run_id: str | None, metrics: dict[str, float]) -> str:
    """The stage's MLflow run (nested under `parent_run_id`): TRL config and plan as params, curves,
    metrics; returns its id."""
    with stage_run(stage, parent_run_id) as run:
        mlflow.log_params(fitted.arguments | (fitted.plan.params() if fitted.plan else {}))
        log_history(run.info.run_id, fitted.history)
        measured = {"peak_memory_gib": fitted.peak_memory_gib} if fitted.peak_memory_gib is not None else {}
        mlflow.log_metrics(fitted.metrics | measured | metrics)
        return run.info.run_id


@task(
    name="record-stage",
    task_run_name="record-{stage}",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless_user_error,
    cache_policy=RECORD_CACHE,
    persist_result=True,
)
def record_stage(stage: str, fitted: FitResult, run: RunContext, metrics: dict[str, float] | None = None) -> str:
    return record_fit(stage, fitted, run.parent_run_id, metrics or {})
