"""Reading the MLflow Model Registry: which versions exist, how they scored, and using one."""

from __future__ import annotations

import re

from mlflow import MlflowClient

# Shown per version: the gate's figures, and each judge's held-out accuracy (whatever its aspect is called).
SHOWN_METRICS = re.compile(
    r"implicit_reward\.accuracy|combined\.lc_win_rate|promotion\.improvement"
    r"|[^.]+\.pairwise_accuracy"
)


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
            rows.append(
                {
                    "name": model.name,
                    "version": str(version.version),
                    "run_id": parent_id or "",
                    "aliases": sorted(aliases_by_version.get(str(version.version), [])),
                    "metrics": {key: value for key, value in sorted(metrics.items()) if SHOWN_METRICS.fullmatch(key)},
                }
            )
    return sorted(rows, key=lambda row: (row["name"], -int(row["version"])))


def answer_tokens(model_uri: str, default: int = 128) -> int:
    """The answer length a registered chat model was evaluated with (its served default)."""
    import mlflow

    try:
        config = mlflow.models.get_model_info(model_uri).flavors.get("python_function", {}).get("config") or {}
    except mlflow.exceptions.MlflowException:
        return default
    return int(config.get("max_new_tokens", default))


def generate(model_uri: str, prompt: str, max_new_tokens: int | None = None, system: str | None = None) -> str:
    """Load a registered policy (e.g. `models:/preftune-policy@champion`) and answer one chat prompt
    greedily, through the code the evaluation answers with; by default as long as it was evaluated."""
    from tasks.answers import generate as answer
    from tasks.answers import load_policy

    max_new_tokens = max_new_tokens or answer_tokens(model_uri)
    model, tokenizer = load_policy(model_uri)
    return answer(model, tokenizer, [chat(prompt, system)], max_new_tokens, batch_size=1)[0][0]


def score(
    judge_uri: str, prompt: str, answers: list[str], max_length: int = 512, system: str | None = None
) -> list[float]:
    """A registered judge's rewards (e.g. `models:/preftune-reward-helpfulness@candidate`) for answers to one
    prompt, through the code the evaluation scores with."""
    from tasks.scoring import RewardScorer

    return RewardScorer(judge_uri, max_length).score([chat(prompt, system)] * len(answers), answers).tolist()


def chat(prompt: str, system: str | None = None) -> list[dict]:
    """One user prompt, after a system message when there is one, as chat messages."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
