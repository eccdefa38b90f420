"""Reading the MLflow Model Registry: which versions exist, how they scored, and using one."""
from __future__ import annotations

import re

import mlflow
from mlflow import MlflowClient

from tasks.base import PreftuneError

# Shown per version: the gate's figures, and each judge's held-out accuracy (whatever its aspect is called).
SHOWN_METRICS = re.compile(r"implicit_reward\.accuracy|combined\.lc_win_rate|promotion\.improvement"
                           r"|[^.]+\.pairwise_accuracy")


def list_versions(prefix: str = "preftune-") -> list[dict]:
    """Every version of every model named `prefix*`, newest first, with aliases and the key metrics
    of the flow run (MLflow parent run) that produced it."""
    client = MlflowClient()
    rows = []
    for model in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'"):
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in model.aliases.items():
            aliases_by_version.setdefault(str(version), []).append(alias)
        for version in client.search_model_versions(f"name = '{model.name}'"):
            parent_id = version.tags.get("mlflow.parent_run_id") or version.run_id
            metrics = client.get_run(parent_id).data.metrics if parent_id else {}
            rows.append({"name": model.name, "version": str(version.version), "run_id": parent_id or "",
                         "aliases": sorted(aliases_by_version.get(str(version.version), [])),
                         "metrics": {key: value for key, value in sorted(metrics.items())
                                     if SHOWN_METRICS.fullmatch(key)}})
    return sorted(rows, key=lambda row: (row["name"], -int(row["version"])))


def generate(model_uri: str, prompt: str, max_new_tokens: int = 128) -> str:
    """Load a registered policy (e.g. `models:/preftune-policy@champion`) and answer one chat prompt."""
    try:
        generator = mlflow.transformers.load_model(model_uri)
    except mlflow.exceptions.MlflowException as error:
        raise PreftuneError(f"cannot load {model_uri}: {error.message}") from None
    reply = generator([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens, do_sample=False)
    return reply[0]["generated_text"][-1]["content"]
