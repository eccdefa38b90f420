"""DPO: TRL's DPOTrainer with a LoRA adapter (QLoRA where 4-bit loading is on).

With `peft_config`, the reference model is the same weights with the adapter switched off, as in the
recipe, so no second copy of the model is held in memory.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from tasks.base import Workspace
from tasks.data import SplitData
from tasks.models import ModelSettings, load_tokenizer
from tasks.plan import TrainingPlan, default_plan
from tasks.tracking import stage_run
from tasks.training import TrainerSettings, fit, load_pairs, training_task


class DPOSettings(TrainerSettings):
    beta: float = 0.1
    loss_type: str = "sigmoid"
    precompute_ref_log_probs: bool = False  # the auto plan turns it on when training sees the data more than once


class DPOResult(BaseModel):
    adapter_dir: str
    metrics: dict[str, float]  # held-out: eval_rewards_accuracies, eval_rewards_margins, ...
    mlflow_run_id: str


def train_dpo_adapter(settings: DPOSettings, model: ModelSettings, model_path: str, splits: SplitData,
                      stage_dir: Path, parent_run_id: str | None = None,
                      callbacks: list | None = None, plan: TrainingPlan | None = None) -> DPOResult:
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tokenizer = load_tokenizer(model_path, model)
    plan = plan or default_plan("dpo", "dpo", settings, model, model_path, splits.train.rows)

    def make_trainer(plan: TrainingPlan) -> DPOTrainer:
        network = AutoModelForCausalLM.from_pretrained(model_path, **plan.load_kwargs(model))
        return DPOTrainer(
            model=network,
            args=DPOConfig(**settings.trainer_args(stage_dir / "checkpoints", plan, "dpo")),
            train_dataset=load_pairs(splits.train.path),
            eval_dataset=load_pairs(splits.eval.path),
            processing_class=tokenizer,
            peft_config=settings.lora.peft_config("CAUSAL_LM", network.config.num_hidden_layers),
            callbacks=callbacks,
        )

    with stage_run("dpo", parent_run_id) as run:
        fitted = fit(make_trainer, settings, plan, stage_dir)
        return DPOResult(adapter_dir=fitted.adapter_dir, metrics=fitted.metrics, mlflow_run_id=run.info.run_id)


@training_task("train-dpo")
def train_dpo(settings: DPOSettings, model: ModelSettings, model_path: str, splits: SplitData, plan: TrainingPlan,
              workspace: Workspace, parent_run_id: str | None = None) -> DPOResult:
    stage_dir = workspace.stage("dpo", settings, model, model_path, splits, plan.result_key())
    return train_dpo_adapter(settings, model, model_path, splits, stage_dir, parent_run_id, plan=plan)
