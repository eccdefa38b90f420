"""Disk hygiene: what a run wrote, and removing what no registered model version needs.

Finished training stages already drop their checkpoints (tasks/training.py). `preftune gc` goes
further: in every run folder it removes the stage folders that no registered version points into
(data splits, adapters, evaluation files, unregistered models), and renews the folder's workspace
token, so Prefect's cached results that named the removed folders are not reused: the next run
re-creates what it needs. MLflow's own deleted runs are `mlflow gc`'s job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from pydantic import BaseModel


def folder_bytes(path: str | Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def local_artifact_root(experiment: str) -> Path | None:
    """Where the experiment's artifacts live, when that is on this disk."""
    found = mlflow.get_experiment_by_name(experiment)
    location = found.artifact_location if found else ""
    if location.startswith("file://"):
        return Path(location.removeprefix("file://"))
    return Path(location) if location.startswith("/") else None


def stored_bytes(run_dir: Path, experiment: str) -> int:
    """Bytes in a run's folder and in the experiment's local MLflow artifacts."""
    artifacts = local_artifact_root(experiment)
    return folder_bytes(run_dir) + (folder_bytes(artifacts) if artifacts and artifacts.exists() else 0)


def registered_folders() -> set[Path]:
    """Local folders that registered model versions point at."""
    client = MlflowClient()
    folders = set()
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name = '{model.name}'"):
            source = version.source.removeprefix("file://")
            if source.startswith("/"):
                folders.add(Path(source).resolve())
    return folders


class CleanupReport(BaseModel):
    removed: list[str]
    kept: list[str]
    bytes_freed: int


def _folders(path: Path) -> list[Path]:
    """Real sub-folders only: a symbolic link may point anywhere, and gc never follows one."""
    return sorted(child for child in path.iterdir() if child.is_dir() and not child.is_symlink())


def collect_garbage(runs_dir: Path, dry_run: bool = False) -> CleanupReport:
    needed = registered_folders()
    removed, kept, freed = [], [], 0
    for run in _folders(runs_dir) if runs_dir.is_dir() else []:
        touched = False
        for stage in _folders(run):
            for keyed in _folders(stage):
                if any(folder == keyed.resolve() or keyed.resolve() in folder.parents for folder in needed):
                    kept.append(str(keyed))
                    continue
                freed += folder_bytes(keyed)
                removed.append(str(keyed))
                touched = True
                if not dry_run:
                    shutil.rmtree(keyed)
        if touched and not dry_run:
            (run / ".workspace-token").write_text(uuid.uuid4().hex)
    return CleanupReport(removed=removed, kept=kept, bytes_freed=freed)
