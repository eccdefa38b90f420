"""The preference-tuning flow: data -> reward model -> DPO -> merge -> evaluate -> register.

The flow only chains tasks and opens the MLflow parent run; each task opens its own nested run.
Tasks pass small typed results (paths, hashes, metrics), and finished stages are cached by Prefect
under the run's workspace, so a re-run with the same settings resumes where the last one stopped.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.config import PipelineConfig
from tasks.base import Workspace
from tasks.data import filter_preferences, format_preferences, load_preferences, read_jsonl, split_preferences
from tasks.dpo import train_dpo
from tasks.evaluate import evaluate
from tasks.merge import merge_adapters
from tasks.models import describe_training_mode, resolve_base_model
from tasks.reward import train_reward
from tasks.tracking import RegisteredVersion, configure, git_commit, register


class PipelineSummary(BaseModel):
    mlflow_run_id: str
    tracking_uri: str
    run_dir: str
    metrics: dict[str, float]
    registered: list[RegisteredVersion]


def _flatten(values: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def _log_lineage(name: str, path: str, source: str) -> None:
    dataset = mlflow.data.from_pandas(read_jsonl(path), source=source, name=name)
    mlflow.log_input(dataset, context=name)


@flow(name="preference-tuning", flow_run_name="{config.profile}")
def preference_tuning(config: PipelineConfig = PipelineConfig()) -> PipelineSummary:
    logger = get_run_logger()
    tracking_uri = configure(config.tracking)
    run_name = config.resolved_run_name()
    workspace = Workspace.open(Path(config.runs_dir) / run_name)
    mode = describe_training_mode(config.model)
    logger.info("run %s in %s; training mode: %s", run_name, workspace.path, mode)

    with mlflow.start_run(run_name=run_name) as parent:
        parent_id = parent.info.run_id
        mlflow.log_params(_flatten(config.model_dump()))
        mlflow.set_tags({f"preftune.{key}": value for key, value in mode.items()}
                        | {"prefect.flow_run_id": str(flow_run.id), "git.commit": git_commit(),
                           "preftune.profile": config.profile, "preftune.run_dir": workspace.path})

        model_path = resolve_base_model(config.model)
        loaded = load_preferences(config.data, workspace)
        filtered = filter_preferences(loaded, config.data, workspace)
        splits = split_preferences(filtered, config.data, workspace)
        formatted = format_preferences(splits, model_path, config.model, workspace)
        mlflow.set_tag("data.sha256", loaded.sha256)
        mlflow.log_metrics({"data.rows_loaded": loaded.rows, "data.rows_kept": filtered.rows,
                            "data.rows_train": splits.train.rows, "data.rows_eval": splits.eval.rows}
                           | {f"data.dropped.{rule}": count for rule, count in filtered.dropped.items()})
        _log_lineage("train", formatted.train.path, loaded.source)
        _log_lineage("eval", formatted.eval.path, loaded.source)
        create_table_artifact(
            key="data-filter",
            table=[{"rule": rule, "dropped": count} for rule, count in filtered.dropped.items()],
            description=f"Recipe filter: {filtered.rows_in} rows in, {filtered.rows} kept",
        )

        reward = train_reward(config.reward, config.model, model_path, formatted, workspace, parent_id)
        dpo = train_dpo(config.dpo, config.model, model_path, formatted, workspace, parent_id)
        policy_dir = merge_adapters(model_path, [dpo.adapter_dir], workspace)
        evaluation = evaluate(config.evaluation, formatted.eval.path, model_path, policy_dir, reward.model_dir,
                              dpo.metrics, workspace, parent_id)

        metrics = evaluation.metrics | {f"reward_{k}": v for k, v in reward.metrics.items() if k == "eval_accuracy"}
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(evaluation.report_path, "evaluation")
        create_markdown_artifact(key="evaluation-report", markdown=Path(evaluation.report_path).read_text(),
                                 description=f"MLflow run {parent_id}")

        registered: list[RegisteredVersion] = []
        if config.tracking.register_models:
            registered = register(policy_dir, reward.model_dir, config.tracking, parent_id,
                                  {"prefect.flow_run_id": str(flow_run.id), "git.commit": git_commit(),
                                   "data.sha256": loaded.sha256, "mlflow.parent_run_id": parent_id})
    summary = PipelineSummary(mlflow_run_id=parent_id, tracking_uri=tracking_uri, run_dir=workspace.path,
                              metrics=metrics, registered=registered)
    logger.info("done: %s", pd.Series(metrics).round(4).to_dict())
    return summary
