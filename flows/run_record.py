"""The flow's parent MLflow run: the settings and lineage tags put on it, the disk the run used, the
run's figures and report, and the summary a user sees at the end (printed, and as Prefect artifacts)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.config import PipelineConfig
from tasks.base import Workspace, fingerprint, redact
from tasks.cleanup import stored_bytes
from tasks.evaluate import EvalResult
from tasks.merge import MergeResult
from tasks.promotion import PromotionOutcome
from tasks.tracking import RegisteredVersion, git_commit
from tasks.verdict import PromotionDecision


class PipelineSummary(BaseModel):
    mlflow_run_id: str
    tracking_uri: str
    run_dir: str
    bytes_written: int
    metrics: dict[str, float]
    promotion: PromotionDecision
    outcome: PromotionOutcome | None = None  # what became of the candidate (None: nothing registered)
    registered: list[RegisteredVersion]
    report_path: str | None = None  # the evaluation's report


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as `a.b.c` MLflow params, credentials redacted."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = redact(str(value))
    return flat


class RunRecord:
    """What the parent run knows while the flow runs: its id, the lineage tags every registered
    version also carries, and what the run has stored so far."""

    def __init__(self, parent, config: PipelineConfig, workspace: Workspace, tracking_uri: str):
        self.parent, self.config, self.workspace, self.tracking_uri = parent, config, workspace, tracking_uri
        self.run_id = parent.info.run_id
        self.lineage = {
            "prefect.flow_run_id": str(flow_run.id),
            "git.commit": git_commit(),
            "mlflow.parent_run_id": self.run_id,
            "config.sha256": fingerprint(config.model_dump(mode="json")),
        }
        self.bytes_before = stored_bytes(Path(workspace.path), config.tracking.experiment)
        self.metrics: dict[str, float] = {}
        self.report_path: str | None = None

    def add_lineage(self, **tags: str) -> None:
        self.lineage |= tags

    def record_evaluation(self, evaluation: EvalResult, merged: MergeResult) -> None:
        self.metrics = evaluation.metrics | {"merge.max_logit_difference": merged.max_logit_difference}
        self.report_path = evaluation.report_path
        mlflow.set_tag("merge.device", merged.device)
        mlflow.log_metrics(self.metrics)
        mlflow.log_artifact(evaluation.report_path, "evaluation")
        create_markdown_artifact(
            key="evaluation-report",
            markdown=Path(evaluation.report_path).read_text(),
            description=f"MLflow run {self.run_id}",
        )

    def summary(
        self, decision: PromotionDecision, registered: list[RegisteredVersion], outcome: PromotionOutcome | None = None
    ) -> PipelineSummary:
        """The run's closing figures: disk used on the parent run, then the run-summary artifact."""
        bytes_written = stored_bytes(Path(self.workspace.path), self.config.tracking.experiment) - self.bytes_before
        mlflow.log_metric("disk.bytes_written", bytes_written)
        return PipelineSummary(
            mlflow_run_id=self.run_id,
            tracking_uri=self.tracking_uri,
            run_dir=self.workspace.path,
            bytes_written=bytes_written,
            metrics=self.metrics,
            promotion=decision,
            outcome=outcome,
            registered=registered,
            report_path=self.report_path,
        )


@contextmanager
def parent_run(config: PipelineConfig, workspace: Workspace, tracking_uri: str) -> Iterator[RunRecord]:
    """The parent run, with every setting as a param and the run's lineage as tags."""
    with mlflow.start_run(run_name=config.resolved_run_name()) as parent:
        record = RunRecord(parent, config, workspace, tracking_uri)
        mlflow.log_params(flatten(config.model_dump()))
        mlflow.set_tags(
            record.lineage
            | {
                "preftune.profile": config.profile,
                "preftune.run_dir": redact(workspace.path),
                "preftune.method": config.method,
            }
        )
        yield record


def summary_markdown(summary: PipelineSummary, experiment_id: str) -> str:
    run_id, tracking_uri = summary.mlflow_run_id, summary.tracking_uri
    if tracking_uri.startswith(("http://", "https://")):
        where = f"[MLflow run {run_id}]({tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    else:
        where = f"MLflow run `{run_id}` in `{tracking_uri}` (browse: `mlflow ui --backend-store-uri {tracking_uri}`)"
    lines = ["# preftune run", "", where, "", "| model | version | alias |", "|---|---|---|"]
    lines += [f"| {v.name} | {v.version} | {v.alias} |" for v in summary.registered]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in sorted(summary.metrics.items()) if "." not in name]
    return "\n".join(lines) + "\n"


def publish_summary(summary: PipelineSummary, experiment_id: str) -> None:
    create_markdown_artifact(
        key="run-summary", markdown=summary_markdown(summary, experiment_id), description="Where this run's results are"
    )
