"""Reward model, DPO and merge on a tiny real Llama: real TRL trainers, a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from tasks.data import DataSettings, apply_filter, format_split, load, split
from tasks.merge import MergeSettings, merge_and_check, merge_into_base
from tasks.models import ModelSettings, RandomInitSettings, ResolvedModel, load_tokenizer
from tasks.plan import DeviceSpec, PlanSettings, default_plan, plan_stage, shape_of
from tasks.policy import PolicySettings, train_policy_adapter
from tasks.recording import record_fit
from tasks.reward import RewardSettings, train_reward_model
from tasks.scoring import RewardScorer
from tasks.tracking import TrackingSettings, configure
from tasks.training import resume_point

MODEL = ModelSettings(random_init=RandomInitSettings())
FAST = dict(max_steps=4, per_device_train_batch_size=4, logging_steps=1, save_steps=2, max_length=96)


@pytest.fixture()
def pairs(tiny_model_path, tmp_path, tracking_uri):
    configure(TrackingSettings())
    settings = DataSettings(synthetic_rows=48)
    data_dir = tmp_path / "data"
    report = apply_filter(load(settings, data_dir), settings, data_dir)
    return format_split(split(report, settings, data_dir), load_tokenizer(tiny_model_path, MODEL), data_dir, 48)


def test_reward_model_trains_on_every_pair_logs_curves_and_scores_pairs(tiny_model_path, pairs, tmp_path):
    assert sum(pairs.overlong.values()) > 0  # some pairs were longer than max_length: shortened, not dropped
    result = train_reward_model(
        "helpfulness",
        RewardSettings(**FAST | {"max_length": 48}),
        ResolvedModel(path=tiny_model_path, settings=MODEL),
        pairs,
        tmp_path / "reward",
    )
    assert result.fit.train_examples == result.train_pairs == pairs.train.rows
    assert result.metrics() == {"train_pairs": pairs.train.rows, "train_pairs_used": pairs.train.rows}
    assert [entry["step"] for entry in result.fit.history if "loss" in entry] == [1, 2, 3, 4]
    scores = RewardScorer(result.model_dir, 128).score([[{"role": "user", "content": "2+2?"}]] * 2, ["4", "5"])
    assert scores.shape == (2,) and scores[0] != scores[1]

    # The judge is its adapter and score head over the base's own weight files, not a second copy of them;
    # MLflow loads the same model from its folder (what the registry hands out).
    mlflow_model = Path(result.model_dir).parent
    weights = [f.relative_to(mlflow_model) for f in mlflow_model.rglob("*.safetensors")]
    assert weights == [Path("peft/adapter_model.safetensors")]
    assert (mlflow_model / weights[0]).stat().st_size < (
        Path(tiny_model_path) / "model.safetensors"
    ).stat().st_size / 50
    loaded = mlflow.transformers.load_model(str(mlflow_model), return_type="components")
    scorer = RewardScorer(result.model_dir, 128)
    scorer.model, scorer.tokenizer = loaded["model"].eval(), loaded["tokenizer"]
    assert scorer.score([[{"role": "user", "content": "2+2?"}]] * 2, ["4", "5"]).tolist() == scores.tolist()
    overlong = [{"role": "user", "content": "Some context. " * 200 + "What is 2+2?"}]  # far past max_length
    scores = RewardScorer(result.model_dir, 128).score([overlong] * 2, ["4", "5"])
    assert scores[0] != scores[1]  # the prompt was cut, not the responses


class Killed(RuntimeError):
    pass


class StopAfter(TrainerCallback):
    """Fault injection: the process dies after `step` (what a kill does, as far as the folder knows)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


def test_dpo_reports_implicit_rewards_and_resumes_from_checkpoint(tiny_model_path, pairs, tmp_path):
    stage, settings = tmp_path / "dpo", PolicySettings(**FAST, evaluate_after_training=True, keep_checkpoints=True)
    model = ResolvedModel(path=tiny_model_path, settings=MODEL)
    with pytest.raises(Killed):
        train_policy_adapter("dpo", settings, model, pairs, stage, callbacks=[StopAfter(3)])
    assert resume_point(stage / "checkpoints").endswith("checkpoint-2")

    # Run again in the same folder: it continues from checkpoint-2 instead of starting again.
    first = train_policy_adapter("dpo", settings, model, pairs, stage)
    assert {"eval_rewards_accuracies", "eval_rewards_margins"} <= first.metrics.keys()  # TRL's own held-out pass
    assert (Path(first.adapter_dir) / "adapter_config.json").is_file()
    assert sorted(p.name for p in (stage / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((stage / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]
    assert [entry["step"] for entry in first.history if "loss" in entry] == [1, 2, 3, 4]


def test_a_finished_stage_keeps_its_adapter_and_history_and_is_recorded_apart(tiny_model_path, pairs, tmp_path):
    stage = tmp_path / "dpo"
    fitted = train_policy_adapter(
        "dpo", PolicySettings(**FAST), ResolvedModel(path=tiny_model_path, settings=MODEL), pairs, stage
    )
    assert not (stage / "checkpoints").exists() and (stage / "adapter" / "adapter_config.json").is_file()
    assert fitted.global_step == 4 and fitted.train_examples == pairs.train.rows and fitted.plan.stage == "dpo"
    # A retry after training finished (a later step of its task failed) trains nothing: the same record.
    assert (
        train_policy_adapter(
            "dpo", PolicySettings(**FAST), ResolvedModel(path=tiny_model_path, settings=MODEL), pairs, stage
        )
        == fitted
    )
    # Recording is its own step: the curves, the plan and the metrics, into any store, as often as asked.
    for store in ("first", "second"):
        configure(TrackingSettings(tracking_uri=f"sqlite:///{tmp_path / store}.db"))
        run_id = record_fit("dpo", fitted, None, {"train_pairs": 3})
        client = mlflow.MlflowClient()
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
        run = client.get_run(run_id).data
        assert run.params["plan.dpo.micro_batch"] == str(fitted.plan.micro_batch) and run.metrics["train_pairs"] == 3
        assert run.tags["preftune.stage"] == "dpo"


def test_merged_model_matches_base_plus_adapter(tiny_model_path, pairs, tmp_path):
    result = train_policy_adapter(
        "dpo",
        PolicySettings(**FAST | {"learning_rate": 1e-2}),
        ResolvedModel(path=tiny_model_path, settings=MODEL),
        pairs,
        tmp_path / "dpo",
    )
    merged_dir = merge_into_base(tiny_model_path, [result.adapter_dir], tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    inputs = tokenizer(["What is 2 + 2?", "Reverse 'abc'."], return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.inference_mode():
        base_logits = base(**inputs).logits
        adapted = PeftModel.from_pretrained(base, result.adapter_dir)(**inputs).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(**inputs).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)  # the adapter changed the model
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


class RecordLayerTypes(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.layer_types = {type(module) for module in model.modules()}
        self.trainable_dtypes = {p.dtype for p in model.parameters() if p.requires_grad}


def test_qlora_trains_on_4bit_nf4_weights_and_merges_into_full_precision(tiny_model_path, pairs, tmp_path):
    """The recipe's QLoRA path through bitsandbytes (which also runs NF4 on a CPU): the adapter trains
    on 4-bit weights and is merged into the fp32 base, matching base+adapter."""
    qlora = ModelSettings(random_init=RandomInitSettings(), quantization={"mode": "4bit", "compute_dtype": "float32"})
    layers = RecordLayerTypes()
    result = train_policy_adapter(
        "dpo",
        PolicySettings(**FAST | {"max_steps": 2, "learning_rate": 1e-2}),
        ResolvedModel(path=tiny_model_path, settings=qlora),
        pairs,
        tmp_path / "dpo",
        callbacks=[layers],
    )
    assert Linear4bit in layers.layer_types  # the base weights it trained on were NF4
    # TRL casts QLoRA weights to bf16; the plan puts them back in fp32 unless it trains in bf16 (fp16's
    # gradient scaler, and a CPU, need fp32).
    plan = default_plan("dpo", "dpo", PolicySettings(**FAST), ResolvedModel(path=tiny_model_path, settings=qlora))
    assert layers.trainable_dtypes == {getattr(torch, plan.trainable_dtype)}
    merged = merge_and_check(
        tiny_model_path, [result.adapter_dir], pairs.eval.path, MergeSettings(), tmp_path / "merged"
    )
    assert merged.max_logit_difference <= MergeSettings().tolerance
    weights = AutoModelForCausalLM.from_pretrained(merged.model_dir).model.layers[0].self_attn.q_proj.weight
    assert weights.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("bf16, mode", [(True, "auto"), (True, "recipe"), (False, "auto"), (False, "recipe")])
def test_plans_train_on_a_real_gpu(tiny_model_path, pairs, tmp_path, bf16, mode):
    """Every plan kind completes optimizer steps on CUDA, including fp16 on 4-bit (the recipe's crash)."""
    device = DeviceSpec.detect().model_copy(update={"bf16": bf16 and DeviceSpec.detect().bf16})
    settings = PolicySettings(
        **FAST | {"max_steps": 2, "gradient_accumulation_steps": 2, "evaluate_after_training": True}
    )
    book_like = MODEL.model_copy(update={"precision": "fp16"})
    plan = plan_stage(
        "dpo", "dpo", settings, book_like, shape_of(book_like, tiny_model_path), device, PlanSettings(mode=mode)
    )
    assert plan.precision == ("bf16" if device.bf16 else "fp16") and plan.device_kind == "cuda"
    result = train_policy_adapter(
        "dpo", settings, ResolvedModel(path=tiny_model_path, settings=book_like), pairs, tmp_path / "dpo", plan=plan
    )
    assert (Path(result.adapter_dir) / "adapter_config.json").is_file()
    assert torch.isfinite(torch.tensor(result.metrics["eval_loss"]))
