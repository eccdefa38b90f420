"""Optional SFT stage: TRL's SFTTrainer with LoRA on chosen responses, or an existing SFT adapter.

Its adapter is merged into the full-precision base, and DPO trains on that merged model, so the DPO
reference (the adapter switched off) is the SFT model, as in the recipe.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from tasks.base import PreftuneError, Workspace
from tasks.data import DataSettings, SplitData, read_jsonl, write_jsonl
from tasks.merge import merge_into_base
from tasks.models import ModelSettings, load_tokenizer
from tasks.plan import TrainingPlan, default_plan
from tasks.tracking import stage_run
from tasks.training import TrainerSettings, fit, load_pairs, training_task


class SFTSettings(TrainerSettings):
    own_fields = TrainerSettings.own_fields | {"enabled", "adapter_path", "data"}
    trl_config = "trl.SFTConfig"

    enabled: bool = False
    adapter_path: str | None = None  # an SFT adapter trained elsewhere: merged, not trained
    data: DataSettings | None = None  # None: the chosen answers of the preference train split
    learning_rate: float = 2e-4


class SFTResult(BaseModel):
    adapter_dir: str
    model_dir: str  # base with the SFT adapter merged: DPO's starting point and reference
    metrics: dict[str, float]
    mlflow_run_id: str | None


def to_prompt_completion(pairs_path: str, out_path: Path) -> str:
    """Conversational preference pairs -> TRL prompt/completion rows on the chosen answer."""
    frame = read_jsonl(pairs_path)
    return write_jsonl(frame[["prompt", "chosen"]].rename(columns={"chosen": "completion"}), out_path).path


def train_sft_adapter(settings: SFTSettings, model: ModelSettings, model_path: str, splits: SplitData,
                      stage_dir: Path, parent_run_id: str | None = None, plan: TrainingPlan | None = None) -> SFTResult:
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    if settings.adapter_path:
        if not (Path(settings.adapter_path) / "adapter_config.json").is_file():
            raise PreftuneError(f"sft.adapter_path {settings.adapter_path} has no adapter_config.json")
        merged = merge_into_base(model_path, [settings.adapter_path], stage_dir / "model")
        return SFTResult(adapter_dir=settings.adapter_path, model_dir=merged, metrics={}, mlflow_run_id=None)

    tokenizer = load_tokenizer(model_path, model)
    plan = plan or default_plan("sft", "sft", settings, model, model_path, splits.train.rows)
    train_path = to_prompt_completion(splits.train.path, stage_dir / "train.jsonl")
    eval_path = to_prompt_completion(splits.eval.path, stage_dir / "eval.jsonl")

    def make_trainer(plan: TrainingPlan) -> SFTTrainer:
        network = AutoModelForCausalLM.from_pretrained(model_path, **plan.load_kwargs(model))
        return SFTTrainer(
            model=network,
            args=SFTConfig(**settings.trainer_args(stage_dir / "checkpoints", plan, "sft")),
            train_dataset=load_pairs(train_path),
            eval_dataset=load_pairs(eval_path),
            processing_class=tokenizer,
            peft_config=settings.lora.peft_config("CAUSAL_LM", network.config.num_hidden_layers),
        )

    with stage_run("sft", parent_run_id) as run:
        fitted = fit(make_trainer, settings, plan, stage_dir)
        merged = merge_into_base(model_path, [fitted.adapter_dir], stage_dir / "model")
        return SFTResult(adapter_dir=fitted.adapter_dir, model_dir=merged, metrics=fitted.metrics,
                         mlflow_run_id=run.info.run_id)


@training_task("train-sft")
def train_sft(settings: SFTSettings, model: ModelSettings, model_path: str, splits: SplitData, plan: TrainingPlan,
              workspace: Workspace, parent_run_id: str | None = None) -> SFTResult:
    stage_dir = workspace.stage("sft", settings, model, model_path, splits, plan.result_key())
    return train_sft_adapter(settings, model, model_path, splits, stage_dir, parent_run_id, plan=plan)
