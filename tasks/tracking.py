"""MLflow: where runs go, nested stage runs, and registering model versions (with their model cards,
under the `candidate` alias). What becomes of a version after that (its verdict recorded, the `champion`
alias) is promotion's: tasks/promotion.py."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported; a user's setting wins

import mlflow  # noqa: E402
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from pydantic import BaseModel

from tasks.base import (
    PreftuneError,
    fingerprint,
    redact,
    redacted_credential_message,
    redacted_settings,
    retry_unless_user_error,
)
from tasks.settings.tracking import TrackingSettings
from tasks.verdict import PromotionDecision

log = logging.getLogger(__name__)
DEFAULT_STORE = Path("mlflow")
SERVING_REQUIREMENTS = ["torch", "transformers", "accelerate", "safetensors"]


class RegisteredVersion(BaseModel):
    name: str
    version: str
    alias: str
    source_run_id: str
    reused: bool = False  # an unchanged model registered before: no new version
    register_run_id: str = ""  # the run that registered it (or found it again) this time: its verdict goes there


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail before any training when a tracking server is down (MLflow itself retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as error:
        raise PreftuneError(
            f"the MLflow tracking server at {redact(uri)} is unreachable ({type(error).__name__}); "
            "start it or set MLFLOW_TRACKING_URI to a reachable store"
        ) from None


def configure(settings: TrackingSettings) -> str:
    """Point MLflow (and the Trainer's MLflow callback, through the environment) at one store."""
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if found := redacted_settings(settings.model_dump(), "tracking."):  # e.g. the promotion flow's parameter
        raise PreftuneError(redacted_credential_message(found))
    if not uri:
        DEFAULT_STORE.mkdir(exist_ok=True)
        uri = f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"
    # A SQLite store keeps its artifacts beside its database (MLflow's default, ./mlruns, would follow
    # whatever the working directory happens to be).
    artifact_location = None
    if uri.startswith("sqlite:///"):
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    check_reachable(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = settings.experiment
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(settings.experiment) is None:
        mlflow.create_experiment(settings.experiment, artifact_location=artifact_location)
    mlflow.set_experiment(settings.experiment)
    return uri


@contextmanager
def stage_run(stage: str, parent_run_id: str | None):
    """A nested MLflow run for one stage, tagged `preftune.stage` from its creation. A failure inside
    marks it FAILED; if the tracking server is gone by then, that is logged and the original error, which
    says what went wrong, propagates (mlflow's own `with start_run()` would raise the server's error instead)."""
    run = mlflow.start_run(
        run_name=stage, nested=parent_run_id is not None, parent_run_id=parent_run_id, tags={"preftune.stage": stage}
    )
    try:
        yield run
    except BaseException:
        try:
            mlflow.end_run("FAILED")
        except MlflowException as error:
            log.warning("could not mark MLflow run %s of stage %s FAILED: %s", run.info.run_id, stage, error.message)
        raise
    mlflow.end_run()


def git_commit() -> str:
    """The checkout's commit; in an image without `.git`, the one it was built from (PREFTUNE_GIT_COMMIT)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PREFTUNE_GIT_COMMIT", "unknown")


def hf_folder(mlflow_model: Path) -> Path:
    """The plain Hugging Face model inside an MLflow transformers model."""
    return Path(mlflow_model) / "model"


def adapter_folder(mlflow_model: Path) -> Path:
    """The PEFT adapter inside an MLflow transformers model saved with `base_model_path` (MLflow's layout)."""
    return Path(mlflow_model) / "peft"


CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n# {{ model_name }}\n\n{{ body }}\n"
CARD_FILES = ("model_card.md", "model_card_data.yaml")  # where mlflow.transformers keeps a model's card


def _hub_id(reference: str) -> bool:
    return reference.count("/") == 1 and not reference.startswith((".", "/", "~")) and not Path(reference).exists()


def declared_license(reference: str) -> str | None:
    """The licence a model's own card declares, read offline: its folder's README.md, or the Hub cache's."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    readme = Path(reference) / "README.md"
    try:
        if not readme.is_file():
            cached = try_to_load_from_cache(reference, "README.md") if _hub_id(reference) else None
            if not isinstance(cached, str):
                return None
            readme = Path(cached)
        return ModelCard.load(readme).data.license
    except Exception:  # a card that does not parse declares nothing we can use
        return None


def model_card(name: str, data: dict, body: str):
    """A Hugging Face model card (YAML metadata the Hub reads, and text for people)."""
    from huggingface_hub import ModelCard, ModelCardData

    return ModelCard.from_template(
        ModelCardData(**{k: v for k, v in data.items() if v not in (None, [], {})}),
        template_str=CARD_TEMPLATE,
        model_name=name,
        body=body,
    )


CHAT = "llm/v1/chat"  # MLflow's chat task: OpenAI-style requests, the chat template applied, only the answer back


def stage_card(model, task_name: str):
    """What a stage knows when it writes a model: its task and base model and that model's licence. Passed
    to MLflow, which otherwise looks the local folder up on the Hub; registration completes it."""
    base = str(getattr(model, "name_or_path", "") or "")
    pipeline_tag = "text-generation" if task_name == CHAT else task_name
    return model_card(
        pipeline_tag,
        {
            "library_name": "transformers",
            "pipeline_tag": pipeline_tag,
            "license": declared_license(base),
            "base_model": base if _hub_id(base) else None,
        },
        "Written by a preftune stage; the registered version's card adds its data and evaluation.",
    )


def save_mlflow_model(
    model,
    tokenizer,
    task_name: str,
    target: Path,
    card=None,
    base_model_path: str | None = None,
    model_config: dict | None = None,
) -> Path:
    """Write a model once, as an MLflow transformers model (MLmodel, `model/` with the weights and the
    tokenizer, so it also loads with `from_pretrained`), with its model card. A PEFT model with
    `base_model_path` keeps only its adapter (`peft/`, tokenizer beside it) and loads over that folder.
    A policy is written as a chat model (`CHAT`), with `model_config` its default generation settings.
    Atomic: a crash leaves no half-written folder."""
    partial = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex[:8]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mlflow.transformers.save_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            path=str(partial),
            task=task_name,
            model_card=card or stage_card(model, task_name),
            base_model_path=base_model_path,
            model_config=model_config,
            pip_requirements=SERVING_REQUIREMENTS + (["peft"] if base_model_path else []),
        )
        tokenizer.save_pretrained(adapter_folder(partial) if base_model_path else hf_folder(partial))
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def registry_card(
    registered_name: str,
    model_dir: str,
    settings: TrackingSettings,
    tags: dict[str, str],
    decision: PromotionDecision | None,
    aspect: str | None = None,
):
    """The registered model's card: licence, base model, data (with digests) and the evaluation's figures
    with their intervals (the policy: the gate's; a reward model: its held-out accuracy as a judge)."""
    import yaml

    card_data = Path(model_dir).parent / CARD_FILES[1]
    written = (yaml.safe_load(card_data.read_text()) or {}) if card_data.is_file() else {}
    base = tags.get("base_model")
    license_ = settings.license or written.get("license") or (declared_license(base) if base else None)
    source = tags.get("data.source")
    results, figures = [], []

    def result(metric: str, label: str, estimate, dataset: tuple[str, str] | None = None) -> None:
        from huggingface_hub import EvalResult

        dataset_type, dataset_name = dataset or (source or "held-out", "held-out questions")
        results.append(
            EvalResult(
                task_type=written.get("pipeline_tag", "text-generation"),
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split="eval",
                metric_type=metric,
                metric_name=label,
                metric_value=round(estimate.value, 6),
            )
        )
        figures.append(f"| {label} | {estimate.text()} | {estimate.n} |")

    def slug(name: str) -> str:
        return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")

    if decision is not None:
        gate = decision.gate
        if aspect is None:
            for name, label in (
                ("lc_improvement", "length-controlled improvement"),
                ("improvement", "improvement"),
                ("ground_truth", "ground-truth pass-rate difference"),
            ):
                if (value := getattr(gate, name)) is not None:
                    result(name, f"{label} over {gate.baseline}", value)
            for name, value in gate.benchmark.items():
                result(
                    f"benchmark.{slug(name)}", f"{name}, difference over {gate.baseline}", value, ("IFEval", "IFEval")
                )
            for name, value in gate.drift.items():
                result(
                    f"drift.{slug(name)}",
                    f"control prompts: {name}, difference over {gate.baseline}",
                    value,
                    ("control prompts", "control prompts"),
                )
        for judge in gate.judges:
            if aspect in (None, judge.aspect):
                result(f"judge.{judge.aspect}.accuracy", f"{judge.aspect} judge accuracy", judge.accuracy)
    what = tags.get("method", "reward model") if aspect is None else f"reward model for {aspect}"
    body = [
        f"Preference-tuned with preftune ({what}).",
        "",
        f"- base model: {base or 'unknown'}",
        f"- licence: {license_ or 'not declared'}",
        f"- data: {source or 'unknown'} (sha256 {tags.get('data.sha256', 'unknown')})",
        f"- code: commit {tags.get('git.commit', 'unknown')}",
    ]
    if decision is not None and aspect is None:
        body += ["", decision.statement()]
    if figures:
        body += ["", "| figure | value [95 % interval] | n |", "|---|---|---|", *figures]
    return model_card(
        registered_name,
        {
            **written,
            "license": license_,
            "base_model": base,
            "datasets": [source] if source else None,
            "model_name": registered_name,
            "eval_results": results or None,
            "tags": ["preftune", tags.get("method")] if aspect is None and tags.get("method") else ["preftune"],
        },
        "\n".join(body),
    )


def write_card(model_dir: str, card) -> None:
    """Put the card where mlflow.transformers keeps one, beside the MLmodel the version points at."""
    folder = Path(model_dir).parent
    (folder / CARD_FILES[0]).write_text(card.text, encoding="utf-8")
    import yaml

    (folder / CARD_FILES[1]).write_text(yaml.safe_dump(card.data.to_dict(), default_flow_style=False), encoding="utf-8")


def _remote_store() -> bool:
    return mlflow.get_tracking_uri().startswith(("http://", "https://", "databricks"))


def register_model(
    model_dir: str, registered_name: str, settings: TrackingSettings, tags: dict[str, str], card=None
) -> RegisteredVersion:
    """Register the MLflow model around `model_dir` without copying it, once: an unchanged re-run finds
    its version again (by the folder, which the stage's key names) and only moves the alias.
    With a local store the version points at the folder; a tracking server gets one copy, logged as
    the active run's artifacts, so machines without this disk can load it. `card` (a model card)
    is written beside the MLmodel first, so both copies carry it."""
    source = Path(model_dir).parent
    if card is not None:
        write_card(model_dir, card)
    key = model_key(model_dir)
    client = MlflowClient()
    try:
        client.create_registered_model(registered_name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    known = [
        v
        for v in client.search_model_versions(f"name = '{registered_name}'")
        if v.tags.get("preftune.model_key") == key
    ]
    run_id = mlflow.active_run().info.run_id
    if known:
        version = known[0]
    else:
        uri = str(source)
        if _remote_store():
            mlflow.log_artifacts(str(source), artifact_path=registered_name)
            uri = f"runs:/{run_id}/{registered_name}"
        version = client.create_model_version(
            registered_name, source=uri, run_id=run_id, tags=tags | {"preftune.model_key": key}
        )
    client.set_registered_model_alias(registered_name, settings.alias, version.version)
    return RegisteredVersion(
        name=registered_name,
        version=str(version.version),
        alias=settings.alias,
        source_run_id=version.run_id or run_id,
        reused=bool(known),
        register_run_id=run_id,
    )


def model_key(model_dir: str) -> str:
    """What identifies a registered model across re-runs: the MLflow model folder around `model_dir`."""
    return fingerprint(str(Path(model_dir).parent.resolve()))


@task(name="register-models", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_unless_user_error)
def register(
    policy_dir: str,
    reward_dirs: dict[str, str],
    decision: PromotionDecision,
    settings: TrackingSettings,
    parent_run_id: str,
    tags: dict[str, str],
    trained_against: list = (),
) -> list[RegisteredVersion]:
    """Register one reward model per aspect and the policy as `candidate`, each with its model card (the
    gate's `decision` gives the cards their figures; recording it on the policy's version, and what
    becomes of the policy, is promotion's: `start_promotion` in flows/promotion.py).
    `trained_against` (judges an online method optimised) is recorded on the policy's version as the
    reward models' versions (`reward.<aspect>` tags), so the registry says what the policy was trained on."""
    with stage_run("register", parent_run_id):
        rewards = {}
        for aspect, model_dir in reward_dirs.items():
            name = f"{settings.reward_model_prefix}-{aspect}"
            rewards[aspect] = register_model(
                model_dir, name, settings, tags, registry_card(name, model_dir, settings, tags, decision, aspect)
            )
        policy = register_model(
            policy_dir,
            settings.policy_model_name,
            settings,
            tags,
            registry_card(settings.policy_model_name, policy_dir, settings, tags, decision),
        )
        client = MlflowClient()
        for judge in trained_against:
            version = rewards.get(judge.aspect)
            source = f"models:/{version.name}/{version.version}" if version else redact(judge.model)
            client.set_model_version_tag(policy.name, policy.version, f"reward.{judge.aspect}", source)
            client.set_model_version_tag(
                policy.name, policy.version, f"reward.{judge.aspect}.weight", str(judge.weight)
            )
        return [policy, *rewards.values()]
