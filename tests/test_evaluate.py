"""Evaluation report, merge check and promotion gate, on tiny real models and a real MLflow registry."""
from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tasks.data import DataSettings, apply_filter, format_split, load, split
from tasks.dpo import DPOSettings, train_dpo_adapter
from tasks.evaluate import EvalSettings, evaluate_policy, length_controlled, win_tie_loss
from tasks.merge import MergeMismatchError, MergeSettings, merge_and_check
from tasks.models import ModelSettings, RandomInitSettings, load_tokenizer
from tasks.reward import RewardSettings, train_reward_model
from tasks.tracking import (PromotionSettings, TrackingSettings, apply_promotion, configure, decide_promotion,
                            log_and_register)

MODEL = ModelSettings(random_init=RandomInitSettings())
FAST = dict(max_steps=3, per_device_train_batch_size=4, logging_steps=1, save_steps=3, max_length=96)


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """Two reward aspects and a DPO adapter on a tiny model, logged to a module-wide MLflow store."""
    root = tmp_path_factory.mktemp("evaluate")
    configure(TrackingSettings(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"))
    tokenizer = load_tokenizer(tiny_model_path, MODEL)
    splits = {}
    for name, source in (("helpfulness", "synthetic"), ("harmlessness", "synthetic:harmlessness")):
        settings = DataSettings(source=source, synthetic_rows=48)
        folder = root / f"data-{name}"
        report = apply_filter(load(settings, folder), settings, folder)
        splits[name] = format_split(split(report, settings, folder), tokenizer, folder)
    rewards = [train_reward_model(name, RewardSettings(**FAST, weight=weight), MODEL, tiny_model_path, pairs,
                                  root / f"reward-{name}")
               for (name, pairs), weight in zip(splits.items(), (1.0, 0.5))]
    dpo = train_dpo_adapter(DPOSettings(**FAST | {"learning_rate": 1e-2}), MODEL, tiny_model_path,
                            splits["helpfulness"], root / "dpo")
    return root, splits["helpfulness"], rewards, dpo


def test_win_tie_loss_and_length_control():
    assert win_tie_loss(np.array([1.0, 0.0, -2.0, 3.0]), 1e-4) == {"win_rate": 0.5, "tie_rate": 0.25, "loss_rate": 0.25}
    # Rewards that only grow with length: once length is controlled for, the longer answers stop winning.
    lengths_tuned, lengths_reference = np.array([20.0, 30.0, 40.0]), np.array([10.0, 10.0, 10.0])
    rewards_tuned, rewards_reference = lengths_tuned * 0.1, lengths_reference * 0.1
    raw = rewards_tuned - rewards_reference
    controlled = length_controlled(raw, lengths_tuned - lengths_reference, np.r_[rewards_tuned, rewards_reference],
                                   np.r_[lengths_tuned, lengths_reference])
    assert (raw > 0).all() and np.allclose(controlled, 0.0)


def test_report_has_every_aspect_examples_and_plots(trained, tiny_model_path):
    root, pairs, rewards, dpo = trained
    merged = merge_and_check(tiny_model_path, [dpo.adapter_dir], pairs.eval.path, MergeSettings(), root / "merged")
    result = evaluate_policy(EvalSettings(generation_prompts=3, max_new_tokens=6), pairs.eval.path, tiny_model_path,
                             merged.model_dir, rewards, dpo.metrics, None,
                             {"dpo": dpo.mlflow_run_id, "reward-helpfulness": rewards[0].mlflow_run_id},
                             root / "evaluate")
    for aspect in ("helpfulness", "harmlessness", "combined"):
        assert {f"{aspect}.win_rate", f"{aspect}.tie_rate", f"{aspect}.loss_rate"} <= result.metrics.keys()
    for aspect in ("helpfulness", "harmlessness"):
        assert {f"{aspect}.pairwise_accuracy", f"{aspect}.lc_win_rate", f"{aspect}.accuracy_short_prompts"} <= result.metrics.keys()
    assert result.gate.baseline == "reference"
    report = Path(result.report_path).read_text()
    assert "| harmlessness |" in report and "| combined |" in report and "## Examples" in report
    assert report.count("\n| ") >= 3 + 3  # aspect rows and three example rows
    artifacts = {a.path for a in MlflowClient().list_artifacts(result.mlflow_run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/examples.json", "evaluation/reward_margins.png",
            "evaluation/training_curves.png"} <= artifacts
    assert (root / "evaluate" / "reward_margins.png").stat().st_size > 1000


def test_merge_check_catches_a_wrong_merge(trained, tiny_model_path):
    root, pairs, _, dpo = trained
    good = merge_and_check(tiny_model_path, [dpo.adapter_dir], pairs.eval.path, MergeSettings(), root / "good")
    assert good.max_logit_difference < 1e-4 and good.prompts_checked == 4
    wrong = root / "wrong"
    shutil.copytree(tiny_model_path, wrong)  # "merged" weights that lack the adapter
    with pytest.raises(MergeMismatchError, match="differs from base\\+adapters"):
        merge_and_check(tiny_model_path, [dpo.adapter_dir], pairs.eval.path, MergeSettings(), wrong)
    assert not wrong.exists() and (root / "wrong.rejected" / "config.json").is_file()


def test_gate_keeps_the_champion_when_the_candidate_is_worse(trained, tiny_model_path):
    settings = TrackingSettings(policy_model_name="gate-policy")
    with mlflow.start_run():
        first = log_and_register(tiny_model_path, "text-generation", "gate-policy", settings, {})
        apply_promotion(first, decide_promotion(0.4, 0.1, "reference", settings.promotion), settings)
        second = log_and_register(tiny_model_path, "text-generation", "gate-policy", settings, {})
        worse = decide_promotion(0.3, 0.4, f"models:/gate-policy/{first.version}", settings.promotion)
        apply_promotion(second, worse, settings)
    client = MlflowClient()
    assert not worse.promoted
    assert str(client.get_model_version_by_alias("gate-policy", "champion").version) == first.version
    assert str(client.get_model_version_by_alias("gate-policy", "candidate").version) == second.version
    assert client.get_model_version("gate-policy", second.version).tags["promotion.promoted"] == "False"
    assert not decide_promotion(0.45, 0.4, "x", PromotionSettings(min_improvement=0.1)).promoted
