"""The quickstart flow end to end with the real SmolLM2-135M model, shortened to a few steps."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows.config import load_config
from flows.preference_tuning import preference_tuning
from tasks.registry import generate, list_versions
from tasks.scoring import RewardScorer


@pytest.mark.slow(minutes=1.2)
def test_quickstart_flow_with_real_model_registers_a_usable_policy(tmp_path, smollm2_path, shared_data, punkt):
    config = load_config(
        "quickstart",
        overrides=[
            f"runs_dir={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "data.synthetic_rows=64",
            "rewards.helpfulness.max_steps=1",
            "policy.max_steps=2",
            "rewards.helpfulness.save_steps=1",
            "policy.save_steps=1",
            "evaluation.generation_prompts=2",
            "evaluation.max_new_tokens=8",
            f"evaluation.benchmark.data={shared_data / 'ifeval_dev.jsonl'}",
            "evaluation.benchmark.trained_prompts=2",
            "evaluation.benchmark.other_prompts=2",
            "evaluation.benchmark.max_new_tokens=8",
            "evaluation.controls.prompts=2",
            "evaluation.controls.max_new_tokens=8",
        ],
    )
    summary = preference_tuning(config)

    metrics = summary.metrics
    assert metrics["generation_prompts"] == 2
    held_out = next(Path(summary.run_dir).glob("data/*/eval.conversational.jsonl")).read_text().splitlines()
    assert metrics["implicit_reward.pairs"] == len(held_out) > 2  # every held-out pair scored
    # Two DPO steps move the policy (the first is the warm-up's, at learning rate 0): its log-probs are no longer
    # the reference's.
    assert metrics["implicit_reward.margin"] != 0.0
    assert summary.promotion.gate.prompts == 2 and summary.promotion.verdict in summary.promotion.explanation()
    # Better where asked, and not worse elsewhere: both questions were asked, on IFEval and on control prompts.
    gate = summary.promotion.gate
    assert gate.checks_run[0] == "IFEval" and gate.checks_run[1].endswith("control prompts")
    assert (
        metrics["benchmark.ifeval.trained_kinds.prompts"] == 2 and metrics["benchmark.ifeval.other_kinds.prompts"] == 2
    )
    assert "IFEval other kinds, prompt loose" in gate.benchmark and "unasked quotes" in gate.drift
    assert "IFEval" in summary.promotion.explanation() and "unasked quotes" in summary.promotion.explanation()
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    client = MlflowClient()
    parent = client.get_run(summary.mlflow_run_id).data
    dpo_plan = {
        key.removeprefix("plan.dpo."): value for key, value in parent.params.items() if key.startswith("plan.dpo.")
    }
    assert (
        parent.tags["preftune.adapter"] == dpo_plan["adapter"]
        and parent.tags["preftune.precision"] == dpo_plan["precision"]
    )
    profile_batch = config.policy.per_device_train_batch_size * config.policy.gradient_accumulation_steps
    assert (
        int(dpo_plan["micro_batch"]) * int(dpo_plan["gradient_accumulation"]) == profile_batch == 4
    )  # the plan keeps it
    listed = {(row["name"], row["version"]): row for row in list_versions()}  # what `preftune models` prints
    policy = listed[("preftune-policy", "1")]
    assert "candidate" in policy["aliases"] and "implicit_reward.accuracy" in policy["metrics"]
    assert ("preftune-reward-helpfulness", "1") in listed
    # The judges are adapters over the base's own weights: the run writes one merged model, not three.
    assert summary.bytes_written < 600 * 2**20
    judged = RewardScorer("models:/preftune-reward-helpfulness@candidate", 64)  # a registered judge loads and scores
    assert judged.score([[{"role": "user", "content": "Capital of France?"}]] * 2, ["Paris.", "Bananas."]).shape == (2,)
    # What `preftune generate` does: load the registered policy by alias and answer.
    assert "Paris" in generate("models:/preftune-policy@candidate", "What is the capital of France?", 10)
    assert metrics["drift.prompts"] > 0 and "drift.facts_named_tuned" in metrics
