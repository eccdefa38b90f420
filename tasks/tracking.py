"""MLflow: where runs go, nested stage runs, and registering models with aliases."""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from prefect import task
from pydantic import BaseModel

from tasks.base import StrictModel, retry_unless_user_error

DEFAULT_STORE = Path("mlflow")
SERVING_REQUIREMENTS = ["torch", "transformers", "accelerate", "safetensors"]


class TrackingSettings(StrictModel):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under ./mlflow
    experiment: str = "preftune"
    policy_model_name: str = "preftune-policy"
    reward_model_name: str = "preftune-reward"
    alias: str = "candidate"
    register_models: bool = True


class RegisteredVersion(BaseModel):
    name: str
    version: str
    alias: str
    source_run_id: str


def configure(settings: TrackingSettings) -> str:
    """Point MLflow (and the Trainer's MLflow callback, through the environment) at one store."""
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifact_location = None
    if not uri:
        DEFAULT_STORE.mkdir(exist_ok=True)
        uri = f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"
        artifact_location = (DEFAULT_STORE / "artifacts").resolve().as_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = settings.experiment
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(settings.experiment) is None:
        mlflow.create_experiment(settings.experiment, artifact_location=artifact_location)
    mlflow.set_experiment(settings.experiment)
    return uri


@contextmanager
def stage_run(stage: str, parent_run_id: str | None):
    """A nested MLflow run for one stage; an exception marks it FAILED instead of losing it."""
    with mlflow.start_run(run_name=stage, nested=parent_run_id is not None, parent_run_id=parent_run_id) as run:
        mlflow.set_tag("preftune.stage", stage)
        yield run


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log_and_register(model_dir: str, task_name: str, registered_name: str, settings: TrackingSettings,
                     tags: dict[str, str]) -> RegisteredVersion:
    """Log the folder with MLflow's transformers flavour, register it, and point the alias at it."""
    import transformers

    # A pipeline, not the folder path: MLflow 3.17's checkpoint-path branch fails with transformers 5.
    info = mlflow.transformers.log_model(
        transformers_model=transformers.pipeline(task_name, model=model_dir),
        name=registered_name.removeprefix("preftune-"),
        task=task_name,
        pip_requirements=SERVING_REQUIREMENTS,  # the inferred list adds torchvision, which breaks loading
        registered_model_name=registered_name,
    )
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    client.set_registered_model_alias(registered_name, settings.alias, version)
    return RegisteredVersion(name=registered_name, version=version, alias=settings.alias,
                             source_run_id=mlflow.active_run().info.run_id)


@task(name="register-models", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_unless_user_error,
      tags=["mlflow"])
def register(policy_dir: str, reward_dir: str, settings: TrackingSettings, parent_run_id: str,
             tags: dict[str, str]) -> list[RegisteredVersion]:
    with stage_run("register", parent_run_id):
        return [
            log_and_register(policy_dir, "text-generation", settings.policy_model_name, settings, tags),
            log_and_register(reward_dir, "text-classification", settings.reward_model_name, settings, tags),
        ]
