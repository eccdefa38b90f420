"""No secret at rest: a run given credentials (in its environment, and in settings that may hold one)
leaves none in Prefect's persisted results and cache records, Prefect's database, the run's folder (every
stage folder) or the MLflow store and its artifacts; and the re-run that takes its stages from those
records still works."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from pathlib import Path

import pytest
from prefect.settings import (
    PREFECT_LOCAL_STORAGE_PATH,
    PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW,
    PREFECT_RESULTS_PERSIST_BY_DEFAULT,
    PREFECT_SERVER_DATABASE_CONNECTION_URL,
    temporary_settings,
)

PASSWORD = "PLANTED-pw-81723"
SIGNATURE = "PLANTEDsig9034"
ENVIRONMENT = {
    "HF_TOKEN": "hf_PLANTEDtoken0123456789abcdef",
    "MLFLOW_TRACKING_USERNAME": "alice",
    "MLFLOW_TRACKING_PASSWORD": "PLANTED-mlflow-pw-5531",
    "AWS_SECRET_ACCESS_KEY": "PLANTED-aws-7713",
}
PLANTED = [
    PASSWORD,
    SIGNATURE,
    ENVIRONMENT["HF_TOKEN"],
    ENVIRONMENT["MLFLOW_TRACKING_PASSWORD"],
    ENVIRONMENT["AWS_SECRET_ACCESS_KEY"],
]


def _contents(path: Path, records: bool) -> list[bytes]:
    """A file's bytes; for Prefect's result storage also the serialized result inside (base64 in its JSON
    record, or the whole file for a bare one), where a pickle keeps strings in clear."""
    raw = path.read_bytes()
    if not records:
        return [raw]
    try:
        encoded = json.loads(raw).get("result")
    except (ValueError, AttributeError):
        encoded = raw
    try:
        return [raw, base64.b64decode(encoded)] if encoded else [raw]
    except (binascii.Error, TypeError, ValueError):
        return [raw]


def leaks(results: Path, *places: Path) -> dict[str, list[str]]:
    """Each file (under the folders) that holds a planted secret, with the secrets it holds."""
    found = {}
    for root in (results, *places):
        for path in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
            contents = _contents(path, records=root == results)
            if hits := [secret for secret in PLANTED if any(secret.encode() in data for data in contents)]:
                found[str(path)] = hits
    return found


def prefect_database() -> list[Path]:
    """The test server's SQLite database and its journal: flow run parameters, states, logs, artifacts."""
    database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().partition(":///")[2])
    assert database.is_file(), database
    return sorted(database.parent.glob(database.name + "*"))


async def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


@pytest.mark.slow(minutes=1)
def test_a_run_and_its_cached_rerun_leave_no_planted_credential_at_rest(
    tmp_path, tiny_model_path, tracking_uri, monkeypatch
):
    """Every task's and the flow's result persisted (Prefect's PREFECT_RESULTS_PERSIST_BY_DEFAULT, as an
    operator may set it), with a signed reference in a model setting the run uses and a password in a data one."""
    from flows.config import load_config
    from flows.preference_tuning import preference_tuning

    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    template = tmp_path / f"chat-template?sig={SIGNATURE}"  # a signed reference to the template's tokenizer
    template.symlink_to(tiny_model_path)
    config = load_config(
        "smoke",
        overrides=[
            f"runs_dir={tmp_path / 'runs'}",
            f"model.tokenizer.chat_template_from={template}",
            f"data.data_dir=https://alice:{PASSWORD}@hub.example.com/subset",
        ],
    )
    assert config.model.tokenizer.chat_template_from == str(template)  # the run has the real values
    results = tmp_path / "prefect-results"
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results, PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
        first = preference_tuning(config, return_state=True)
        second = preference_tuning(config, return_state=True)

    assert first.is_completed() and second.is_completed()
    states = asyncio.run(_task_states(second.state_details.flow_run_id))
    for prefix in ("format-data", "reward-helpfulness", "train-dpo", "evaluate"):  # from the first run's records
        assert {state for name, state in states.items() if name.startswith(prefix)} == {"Cached"}, states
    assert [(v.name, v.version) for v in second.result().registered] == [
        (v.name, v.version) for v in first.result().registered
    ]
    assert len(list(results.iterdir())) > 20  # every task's result, and the flow's
    assert leaks(results, tmp_path / "runs", tmp_path / "mlflow.db", tmp_path / "artifacts", *prefect_database()) == {}


def test_a_failed_stage_keeps_no_credential_in_its_failure_record_or_state(tmp_path, tiny_model_path):
    """A persisted task's exception is persisted too (its failure record), and its message is the state's."""
    from tasks.base import Workspace
    from tasks.data import DataFile, DataSettings, SplitData, format_preferences
    from tasks.models import ModelSettings, ResolvedModel, TokenizerSettings

    signed = f"https://hub.example.com/chat-template?sig={SIGNATURE}"
    settings = ModelSettings(tokenizer=TokenizerSettings(chat_template_from=signed))
    model = ResolvedModel(path=tiny_model_path, settings=settings)
    pairs = DataFile(path=str(tmp_path / "pairs.jsonl"), rows=1, sha256="0")
    results = tmp_path / "prefect-results"
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results, PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
        state = format_preferences(
            SplitData(train=pairs, eval=pairs),
            model,
            128,
            DataSettings(),
            Workspace.open(tmp_path / "runs" / "failing"),
            return_state=True,
        )
    assert state.is_failed()
    assert "PreftuneError: cannot load the tokenizer of 'https://hub.example.com/chat-template?sig=***" in state.message
    assert list(results.iterdir())  # the failure record
    assert leaks(results, tmp_path / "runs", *prefect_database()) == {}
