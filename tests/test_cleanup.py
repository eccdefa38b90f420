"""`preftune gc`: what no registered version needs goes; what one needs stays; the next run still works."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows.cli import main
from flows.config import load_config
from flows.preference_tuning import preference_tuning
from tasks.cleanup import folder_bytes


@pytest.mark.slow(minutes=0.6)
def test_gc_keeps_registered_models_and_the_next_run_recreates_the_rest(tmp_path, monkeypatch, capsys, tiny_model_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    runs = tmp_path / "runs"
    config = load_config("smoke", overrides=[f"runs_dir={runs}", "sft.enabled=false"])  # SFT is not what gc keeps
    first = preference_tuning(config)
    run_dir = Path(first.run_dir)
    token = (run_dir / ".workspace-token").read_text()
    assert not list(run_dir.glob("*/*/checkpoints"))  # finished stages dropped their checkpoints already

    assert main(["gc", "--runs-dir", str(runs), "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and (run_dir / ".workspace-token").read_text() == token
    before = folder_bytes(run_dir)
    assert main(["gc", "--runs-dir", str(runs)]) == 0
    printed = capsys.readouterr().out
    assert folder_bytes(run_dir) < before and "kept 3 that registered model versions point into" in printed
    mlflow.set_tracking_uri(store)
    client = MlflowClient()
    for version in first.registered:  # every registered version still loads from its folder
        source = Path(client.get_model_version(version.name, version.version).source)
        weights = source / ("peft/adapter_config.json" if version.name.startswith(config.tracking.reward_model_prefix) else "model/config.json")
        assert (source / "MLmodel").is_file() and weights.is_file()  # a judge: its adapter, over the cached base
    assert not list(run_dir.glob("dpo/*")) and not list(run_dir.glob("data/*"))
    assert (run_dir / ".workspace-token").read_text() != token  # cached results naming removed folders expire

    second = preference_tuning(config)  # re-creates what it needs; the same models come out again
    assert [(v.name, v.version, v.reused) for v in second.registered] == [
        (v.name, v.version, True) for v in first.registered]
