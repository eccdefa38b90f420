"""Every stage's data, ready to train on: load -> filter -> split -> format for one source, with its
lineage (counts, digest, MLflow dataset inputs, the filter table) recorded on the parent run."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from tasks import stages
from tasks.base import Workspace, redact
from tasks.data import (
    FilterReport,
    LoadedData,
    SplitData,
    filter_preferences,
    format_preferences,
    load_preferences,
    read_jsonl,
    render_example,
    split_preferences,
)
from tasks.models import ResolvedModel
from tasks.settings.data import DataSettings


class PreparedData(BaseModel):
    """One source's pairs: the file loaded, its splits as filtered (the judges' questions among them),
    and those splits formatted with the model's chat template for training."""

    loaded: LoadedData
    splits: SplitData
    formatted: SplitData


def prepare_data(
    settings: DataSettings, model: ResolvedModel, max_length: int, workspace: Workspace, stage: str = stages.DATA
) -> PreparedData:
    loaded = load_preferences(settings, workspace, stage)
    filtered = filter_preferences(loaded, settings, workspace, stage)
    splits = split_preferences(filtered, settings, workspace, stage)
    prepared = PreparedData(
        loaded=loaded,
        splits=splits,
        formatted=format_preferences(splits, model, max_length, settings, workspace, stage),
    )
    record_lineage(stage, prepared, filtered, model, settings)
    return prepared


def record_lineage(
    stage: str, prepared: PreparedData, filtered: FilterReport, model: ResolvedModel, settings: DataSettings
) -> None:
    """What went in and what the recipe's filter kept, on the parent run and as a Prefect table."""
    loaded, splits, formatted = prepared.loaded, prepared.splits, prepared.formatted
    parts = {"train": formatted.train, "eval": formatted.eval} | ({"judge": splits.judge} if splits.judge else {})
    mlflow.set_tag(f"{stage}.sha256", loaded.sha256)
    mlflow.log_metrics(
        {
            f"{stage}.rows_loaded": loaded.rows,
            f"{stage}.rows_kept": filtered.rows,
            f"{stage}.shared_questions": splits.shared_questions,
        }
        | {f"{stage}.rows_{name}": part.rows for name, part in parts.items()}
        | {f"{stage}.dropped.{rule}": count for rule, count in filtered.dropped.items()}
        | {f"{stage}.overlong_{split}": count for split, count in formatted.overlong.items()}
        | {f"{stage}.answers_cut_{split}": count for split, count in formatted.truncated_answers.items()}
    )
    mlflow.log_text(render_example(formatted.train.path, model.tokenizer()), f"data/{stage}-example.txt")
    for name, part in parts.items():
        mlflow.log_input(
            mlflow.data.from_pandas(
                read_jsonl(part.path),
                source=dataset_source(loaded, settings),
                name=f"{stage}-{name}",
                digest=part.sha256[:16],
            ),
            context=name,
        )
    create_table_artifact(
        key=f"{stage}-filter",
        table=[{"rule": rule, "dropped": count} for rule, count in filtered.dropped.items()],
        description=f"{redact(loaded.source)}: {filtered.rows_in} rows in, {filtered.rows} kept after the recipe "
        "filter; "
        f"split by question: {' / '.join(f'{n} {p.rows}' for n, p in parts.items())}",
    )


def prepare_judge_data(
    aspect: str,
    data: DataSettings | None,
    model: ResolvedModel,
    max_length: int,
    pipeline: PreparedData,
    pipeline_settings: DataSettings,
    workspace: Workspace,
) -> SplitData:
    """A judge's pairs: its own source, or the pipeline's questions set aside for judges (never the
    policy's), formatted for the judge's own max_length so its trainer drops nothing."""
    if data is not None:
        return prepare_data(data, model, max_length, workspace, stages.data_for(aspect)).formatted
    return format_preferences(
        pipeline.splits.for_judges(), model, max_length, pipeline_settings, workspace, stages.judge_data(aspect)
    )


def dataset_source(loaded: LoadedData, settings: DataSettings):
    """Where the pairs came from, as MLflow's typed source (a local file, a Hub dataset, or our own
    generator), so MLflow records it as what it is instead of guessing from a string."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    if loaded.source.startswith("synthetic"):
        return CodeDatasetSource(tags={"generator": loaded.source})
    if Path(loaded.source).is_file():
        local = next(source for source in get_registered_sources() if source._get_source_type() == "local")
        return local(redact(loaded.source))
    return HuggingFaceDatasetSource(
        path=redact(loaded.source),
        split=settings.split,
        data_dir=redact(settings.data_dir) if settings.data_dir else None,
    )
