"""Evaluation report, intervals, merge check and promotion gate, on tiny real models and a real MLflow registry."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tasks.answers import load_policy
from tasks.data import apply_filter, format_split, load, read_jsonl, split
from tasks.evaluate import Judge, evaluate_policy, sample_prompts
from tasks.merge import MergeMismatchError, merge_and_check
from tasks.models import ResolvedModel, load_tokenizer
from tasks.policy import train_policy_adapter
from tasks.promotion import current_champion, decide_outcome, decide_promotion, log_decision
from tasks.recording import record_fit
from tasks.reward import train_reward_model
from tasks.scoring import answer_logps, length_controlled_wins, win_rates
from tasks.settings.data import DataSettings
from tasks.settings.evaluation import EvalSettings, MergeSettings
from tasks.settings.models import ModelSettings, RandomInitSettings
from tasks.settings.tracking import PromotionSettings, TrackingSettings
from tasks.settings.training import PolicySettings, RewardSettings
from tasks.stats import Estimate, mean
from tasks.tracking import configure, hf_folder, register_model, save_mlflow_model
from tasks.verdict import GateInput, standing

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
        settings = DataSettings(source=source, synthetic_rows=60, eval_fraction=0.3)
        folder = root / f"data-{name}"
        report = apply_filter(load(settings, folder), settings, folder)
        splits[name] = format_split(split(report, settings, folder), tokenizer, folder, 96)
    judges = []
    for (name, pairs), weight in zip(splits.items(), (1.0, 0.5)):
        reward = train_reward_model(
            name,
            RewardSettings(**FAST, weight=weight),
            ResolvedModel(path=tiny_model_path, settings=MODEL),
            pairs,
            root / f"reward-{name}",
        )
        judges.append(
            Judge(
                aspect=name,
                weight=weight,
                model=reward.model_dir,
                eval_path=reward.eval_path,
                provenance=f"trained on {reward.train_pairs} pairs",
            )
        )
    dpo = train_policy_adapter(
        "dpo",
        PolicySettings(**FAST | {"learning_rate": 1e-2}),
        ResolvedModel(path=tiny_model_path, settings=MODEL),
        splits["helpfulness"],
        root / "dpo",
    )
    return root, splits["helpfulness"], judges, dpo


def test_intervals_cover_the_truth_and_shrink_with_more_data():
    rng = np.random.default_rng(1)
    small, large = mean(rng.random(40) < 0.7), mean(rng.random(400) < 0.7)
    assert small.ci_low < 0.7 < small.ci_high and large.ci_low < 0.7 < large.ci_high
    assert (large.ci_high - large.ci_low) < 0.5 * (small.ci_high - small.ci_low)
    assert mean(np.ones(10)).model_dump() == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 10}


def test_win_rates_and_length_control():
    metrics = win_rates(np.array([1.0, 0.0, -2.0, 3.0]), np.zeros(4), np.ones(4), np.ones(4), "a.", tie_tolerance=1e-4)
    assert (metrics["a.win_rate"], metrics["a.tie_rate"], metrics["a.loss_rate"]) == (0.5, 0.25, 0.25)
    assert metrics["a.win_rate.ci_low"] < 0.5 < metrics["a.win_rate.ci_high"]
    # Rewards that only grow with length: once length is controlled for, the longer answers stop winning.
    lengths_tuned, lengths_reference = np.array([20.0, 30.0, 40.0]), np.array([10.0, 10.0, 10.0])
    rewards_tuned, rewards_reference = lengths_tuned * 0.1, lengths_reference * 0.1
    raw = rewards_tuned - rewards_reference
    assert (raw > 0).all()
    assert (
        length_controlled_wins(
            raw,
            lengths_tuned - lengths_reference,
            np.r_[rewards_tuned, rewards_reference],
            np.r_[lengths_tuned, lengths_reference],
            1e-4,
        )
        == 0.0
    )


def test_prompt_sample_is_seeded_random_and_distinct(trained):
    _, pairs, _, _ = trained
    frame = read_jsonl(pairs.eval.path)
    first, again = (list(sample_prompts(frame, EvalSettings(generation_prompts=5)).prompt) for _ in range(2))
    other = list(sample_prompts(frame, EvalSettings(generation_prompts=5, seed=1)).prompt)
    assert first == again and first != other and len({repr(p) for p in first}) == 5
    assert first != [list(p) for p in frame.prompt[:5]]  # not simply the first rows
    assert len(sample_prompts(frame, EvalSettings(generation_prompts=10_000))) == len(
        {repr(list(p)) for p in frame.prompt}
    )


def test_answer_logps_match_a_direct_computation(tiny_model_path):
    import torch

    model, tokenizer = load_policy(tiny_model_path)
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    logps, lengths = answer_logps(model, tokenizer, [prompt, prompt], ["4", "It is four."], 512, batch_size=2)
    head = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
    full = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": "It is four."}], tokenize=True, return_dict=False
    )
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([full])).logits[0].float()
    direct = sum(torch.log_softmax(logits[i - 1], -1)[full[i]].item() for i in range(len(head), len(full)))
    assert lengths[1] == len(full) - len(head) and logps[1] == pytest.approx(direct, abs=1e-3)
    assert logps[0] != logps[1]


def test_report_has_intervals_for_every_figure_and_names_the_judges(trained, tiny_model_path):
    root, pairs, judges, dpo = trained
    merged = merge_and_check(tiny_model_path, [dpo.adapter_dir], pairs.eval.path, MergeSettings(), root / "merged")
    result = evaluate_policy(
        EvalSettings(generation_prompts=3, max_new_tokens=6),
        pairs.eval.path,
        tiny_model_path,
        merged.model_dir,
        judges,
        None,
        root / "evaluate",
        stage_runs={"dpo": record_fit("dpo", dpo, None, {})},
    )
    metrics = result.metrics
    rates = [name for name in metrics if name.endswith(("accuracy", "win_rate", "tie_rate", "loss_rate"))]
    assert len(rates) >= 2 * 5 + 1
    for name in rates:
        assert metrics[f"{name}.ci_low"] < metrics[f"{name}.ci_high"] or metrics[name] in (0.0, 1.0), name
    assert metrics["generation_prompts"] == 3 and metrics["implicit_reward.pairs"] == pairs.eval.rows
    # Tuned vs itself would be all ties; this policy moved, so its log-probs differ from the reference's.
    assert metrics["implicit_reward.margin"] != 0
    # Each judge's standing follows its own held-out interval, and the report says why.
    for judge in result.gate.judges:
        low = metrics[f"{judge.aspect}.pairwise_accuracy.ci_low"]
        assert judge.heard == (low > 0.5) and metrics[f"{judge.aspect}.heard"] == float(judge.heard)
        assert -1 <= metrics[f"{judge.aspect}.length_correlation"] <= 1 and f"{judge.aspect}.lc_improvement" in metrics
    assert result.gate.baseline == "reference" and result.gate.prompts == 3
    report = Path(result.report_path).read_text()
    assert "trained on" in report and "| harmlessness | 0.5 |" in report and "length-matched" in report
    assert report.count(" [") >= len(rates)  # every rate printed with its interval
    run = MlflowClient().get_run(result.mlflow_run_id)
    assert "implicit_reward.accuracy.ci_low" in run.data.metrics
    assert {f"judge.{j.aspect}.heard" for j in judges} <= set(run.data.tags)
    artifacts = {a.path for a in MlflowClient().list_artifacts(result.mlflow_run_id, "evaluation")}
    assert {
        "evaluation/report.md",
        "evaluation/examples.json",
        "evaluation/reward_margins.png",
        "evaluation/training_curves.png",
    } <= artifacts


def test_a_planted_judge_at_chance_is_reported_but_not_heard(trained, tiny_model_path, coin_judge_path, tmp_path):
    """A reward model whose head was never trained (random) scores the answers like any judge, and is
    reported with its accuracy, but has no say: the gate is the same with or without it."""
    root, pairs, judges, dpo = trained
    planted = Judge(
        aspect="coin", weight=100.0, model=coin_judge_path, eval_path=pairs.eval.path, provenance="a random head"
    )
    settings = EvalSettings(generation_prompts=4, max_new_tokens=6)
    merged = merge_and_check(tiny_model_path, [dpo.adapter_dir], pairs.eval.path, MergeSettings(), root / "merged-coin")
    without = evaluate_policy(
        settings, pairs.eval.path, tiny_model_path, merged.model_dir, judges[:1], None, tmp_path / "without"
    )
    with_coin = evaluate_policy(
        settings, pairs.eval.path, tiny_model_path, merged.model_dir, judges[:1] + [planted], None, tmp_path / "with"
    )
    coin_standing = next(j for j in with_coin.gate.judges if j.aspect == "coin")
    assert not coin_standing.heard and coin_standing.accuracy.ci_low <= 0.5 < coin_standing.accuracy.ci_high
    assert "coin.win_rate" in with_coin.metrics  # it printed its verdict on the answers ...
    assert with_coin.gate.lc_improvement == without.gate.lc_improvement  # ... and nobody listened
    assert "| coin | 100 | a random head |" in Path(with_coin.report_path).read_text()


def test_merge_check_catches_a_wrong_merge(trained, tiny_model_path):
    root, pairs, _, dpo = trained
    good = merge_and_check(tiny_model_path, [dpo.adapter_dir], pairs.eval.path, MergeSettings(), root / "good")
    assert good.max_logit_difference < 1e-4 and good.prompts_checked == 4
    wrong = root / "wrong"
    shutil.copytree(tiny_model_path, wrong / "model")  # "merged" weights that lack the adapter
    with pytest.raises(MergeMismatchError, match="differs from base\\+adapters"):
        merge_and_check(tiny_model_path, [dpo.adapter_dir], pairs.eval.path, MergeSettings(), wrong)
    assert not wrong.exists() and (root / "wrong.rejected" / "model" / "config.json").is_file()


HEARD = standing("helpfulness", 1.0, Estimate(value=0.86, ci_low=0.79, ci_high=0.94, n=65), 0.1, 0.5)


def _gate(low: float, value: float, high: float, baseline: str = "reference", judges=(HEARD,)) -> GateInput:
    interval = Estimate(value=value, ci_low=low, ci_high=high, n=32)
    return GateInput(
        baseline=baseline,
        judges=list(judges),
        candidate_score=value,
        baseline_score=0.0,
        improvement=interval,
        lc_improvement=interval,
        prompts=32,
        judge_lc_improvement={judge.aspect: interval for judge in judges},
    )


def test_gate_promotes_only_when_the_interval_clears_the_margin():
    assert decide_promotion(_gate(0.05, 0.2, 0.35), PromotionSettings()).promoted
    lucky = decide_promotion(_gate(-0.02, 0.2, 0.4), PromotionSettings())  # a good mean, an interval across 0
    assert not lucky.promoted and lucky.verdict == "not shown" and "lower bound at or below 0" in lucky.explanation()
    assert not decide_promotion(_gate(0.05, 0.2, 0.35), PromotionSettings(min_improvement=0.1)).promoted
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        PromotionSettings(min_improvement=-1e9)  # the gate cannot be talked into passing a worse model


def _mlflow_model(source: str, target: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_mlflow_model(
        AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source), "text-generation", target
    )
    return str(hf_folder(target))


def test_registration_points_at_the_model_once_and_copies_nothing(trained, tiny_model_path, tmp_path):
    settings = TrackingSettings(policy_model_name="once-policy")
    folder = _mlflow_model(tiny_model_path, tmp_path / "policy")
    artifacts = Path(mlflow.get_tracking_uri().removeprefix("sqlite:///")).parent
    before = sum(f.stat().st_size for f in artifacts.rglob("*") if f.is_file())
    with mlflow.start_run():
        first = register_model(folder, "once-policy", settings, {"data.sha256": "x"})
        again = register_model(folder, "once-policy", settings, {"data.sha256": "x"})
    after = sum(f.stat().st_size for f in artifacts.rglob("*") if f.is_file())
    client = MlflowClient()
    assert (first.reused, again.reused, again.version) == (False, True, first.version)
    assert len(client.search_model_versions("name = 'once-policy'")) == 1
    assert client.get_model_version("once-policy", first.version).source == str(tmp_path / "policy")
    weights = (tmp_path / "policy" / "model" / "model.safetensors").stat().st_size
    assert after - before < weights / 2  # metadata only: the weights stay where they are
    loaded = mlflow.transformers.load_model("models:/once-policy@candidate", return_type="components")
    assert loaded["model"].config.hidden_size == 64  # models:/ loads the registered folder


def promote_as_registered(version, decision, settings: TrackingSettings):
    """What `register` and the promote-candidate flow do with `approval: auto`: record, then decide."""
    log_decision(version, decision)
    return decide_outcome(version.name, version.version, decision, settings.promotion)


def test_gate_keeps_the_champion_when_the_candidate_is_worse_or_unjudged(trained, tiny_model_path, tmp_path):
    settings = TrackingSettings(policy_model_name="gate-policy")
    coin = standing("helpfulness", 1.0, Estimate(value=0.55, ci_low=0.43, ci_high=0.67, n=65), 0.0, 0.5)
    with mlflow.start_run():
        first = register_model(_mlflow_model(tiny_model_path, tmp_path / "one"), "gate-policy", settings, {})
        promote_as_registered(first, decide_promotion(_gate(0.1, 0.3, 0.5), settings.promotion), settings)
        second = register_model(_mlflow_model(tiny_model_path, tmp_path / "two"), "gate-policy", settings, {})
        worse = decide_promotion(_gate(-0.3, -0.1, 0.05, f"models:/gate-policy/{first.version}"), settings.promotion)
        promote_as_registered(second, worse, settings)
        third = register_model(_mlflow_model(tiny_model_path, tmp_path / "three"), "gate-policy", settings, {})
        # Judged only by a judge at chance, even a huge "improvement" is no evidence.
        unjudged = decide_promotion(
            GateInput(baseline=f"models:/gate-policy/{first.version}", judges=[coin]), settings.promotion
        )
        promote_as_registered(third, unjudged, settings)
    client = MlflowClient()
    assert not worse.promoted and unjudged.verdict == "no evidence" and not unjudged.promoted
    assert str(client.get_model_version_by_alias("gate-policy", "champion").version) == first.version
    assert str(client.get_model_version_by_alias("gate-policy", "candidate").version) == third.version
    tags = client.get_model_version("gate-policy", second.version).tags
    assert tags["promotion.promoted"] == "False" and tags["promotion.lc_improvement_ci"].startswith("[-0.3")
    assert tags["judge.helpfulness.heard"] == "True" and "lower bound above 0.5" in tags["judge.helpfulness.reason"]
    tags = client.get_model_version("gate-policy", third.version).tags
    assert tags["promotion.verdict"] == "no evidence" and tags["judge.helpfulness.heard"] == "False"
    assert "cannot be told from chance" in tags["judge.helpfulness.reason"]
    # An unchanged re-run's candidate is the champion itself: it is compared with its reference again.
    assert current_champion(settings, str(tmp_path / "one" / "model")) is None
    assert current_champion(settings, str(tmp_path / "two" / "model")) == f"models:/gate-policy/{first.version}"


def test_out_of_memory_while_evaluating_halves_the_batch():
    """A real allocator failure (the CPU's, for more memory than any address space holds) and the CUDA
    allocator's error as torch words it both halve the batch; any other error is not retried."""
    import torch

    from tasks.answers import shrinking
    from tasks.base import PreftuneError

    tried = []

    def run(size):
        tried.append(size)
        return torch.empty(size << 56 if size > 2 else size, dtype=torch.uint8).numel()

    assert shrinking(run, 8) == 2 and tried == [8, 4, 2]
    cuda_oom = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
        "of 79.19 GiB of which 1.02 GiB is free."
    )
    with pytest.raises(PreftuneError, match="out of memory while evaluating at batch size 1"):
        shrinking(lambda size: (_ for _ in ()).throw(cuda_oom), 4)
    tried.clear()

    def broken(size):
        tried.append(size)
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        shrinking(broken, 8)
    assert tried == [8]


@pytest.mark.slow(minutes=0.7)
def test_cli_evaluates_any_policy_on_any_preference_file(
    trained, tiny_model_path, shared_data, tmp_path, monkeypatch, capsys
):
    from flows.cli import main

    root, pairs, judges, dpo = trained
    policy = merge_and_check(tiny_model_path, [dpo.adapter_dir], pairs.eval.path, MergeSettings(), root / "cli-merged")
    store = f"sqlite:///{tmp_path / 'evaluate.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    orca = tmp_path / "orca.jsonl"  # a schema the flow's own data does not use: the sample's first 60 rows
    orca.write_text("".join((shared_data / "orca_dpo_pairs.sample.jsonl").read_text().splitlines(keepends=True)[:60]))
    assert (
        main(
            [
                "evaluate",
                "--policy",
                policy.model_dir,
                "--reference",
                tiny_model_path,
                "--data",
                str(orca),
                "--judge",
                f"helpfulness={judges[0].model}@2",
                "--generation-prompts",
                "4",
                "--max-new-tokens",
                "4",
                "--max-length",
                "128",
                "--runs-dir",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    run_id = printed.split("MLflow run id : ")[1].split()[0]
    run = MlflowClient(tracking_uri=store).get_run(run_id)
    metrics = run.data.metrics
    assert metrics["implicit_reward.pairs"] == 60 and metrics["helpfulness.eval_pairs"] == 60
    assert metrics["generation_prompts"] == 4 and "helpfulness.lc_win_rate.ci_low" in metrics
    # A tiny judge trained 3 steps on other data is at chance on orca: heard only if its lower bound says otherwise.
    assert (metrics["helpfulness.pairwise_accuracy.ci_low"] > 0.5) == ("combined.lc_improvement" in metrics)
    assert run.data.params["evaluate.judge.helpfulness"].startswith("given: ")
    assert "implicit_reward.accuracy" in printed and " [" in printed and "verdict       : " in printed


def test_stage_runs_nest_under_their_parent_and_keep_the_stage_error(tracking_uri, caplog):
    from tasks.tracking import stage_run

    configure(TrackingSettings())
    client = MlflowClient()
    with mlflow.start_run(run_name="flow") as parent:
        with stage_run("reward-helpfulness", parent.info.run_id) as finished:
            mlflow.log_metric("accuracy", 1.0)
        with pytest.raises(ValueError, match="the stage's own error"), stage_run("dpo", parent.info.run_id) as failed:
            raise ValueError("the stage's own error")
        # The store refuses to mark a deleted run FAILED: the stage's error, not the store's, surfaces.
        with (
            pytest.raises(ValueError, match="the stage's own error"),
            stage_run("evaluate", parent.info.run_id) as gone,
        ):
            client.delete_run(gone.info.run_id)
            raise ValueError("the stage's own error")
        assert mlflow.active_run().info.run_id == parent.info.run_id
    assert f"could not mark MLflow run {gone.info.run_id} of stage evaluate FAILED" in caplog.text
    for run, stage, status in ((finished, "reward-helpfulness", "FINISHED"), (failed, "dpo", "FAILED")):
        stored = client.get_run(run.info.run_id)
        assert (stored.info.status, stored.info.run_name, stored.data.tags["preftune.stage"]) == (status, stage, stage)
        assert stored.data.tags["mlflow.parentRunId"] == parent.info.run_id
    with stage_run("register", None) as alone:  # no parent: a run of its own
        pass
    stored = client.get_run(alone.info.run_id)
    assert "mlflow.parentRunId" not in stored.data.tags and stored.data.tags["preftune.stage"] == "register"
