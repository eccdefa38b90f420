"""No secret at rest when a stage fails: its failure record and state keep no credential. (A finished
run and its cached re-run leave none either: tests/test_flow.py, on the smoke runs it makes anyway.)"""

from __future__ import annotations

from at_rest import SIGNATURE, leaks, prefect_database
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings


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
