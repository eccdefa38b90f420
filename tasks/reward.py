"""Reward models: TRL's RewardTrainer with a LoRA adapter and a scalar (SEQ_CLS) head.

One model per aspect (helpfulness, harmlessness, ...), each on its own data and backbone if set.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from tasks.base import Workspace
from tasks.data import DataSettings, SplitData
from tasks.merge import merge_into_base
from tasks.models import ModelSettings, load_tokenizer
from tasks.plan import TrainingPlan, default_plan
from tasks.tracking import stage_run
from tasks.training import TrainerSettings, fit, load_pairs, training_task


class RewardSettings(TrainerSettings):
    own_fields = TrainerSettings.own_fields | {"weight", "data", "model"}

    learning_rate: float = 1e-4
    weight: float = Field(1.0, gt=0)  # share of this aspect in the combined score
    data: DataSettings | None = None  # None: the pipeline's preference data
    model: ModelSettings | None = None  # None: the policy's base model (a small encoder also works)


class RewardResult(BaseModel):
    aspect: str
    weight: float
    eval_path: str  # this aspect's held-out pairs
    model_dir: str  # merged, full precision: what scores responses and gets registered
    adapter_dir: str
    metrics: dict[str, float]
    mlflow_run_id: str


def train_reward_model(aspect: str, settings: RewardSettings, model: ModelSettings, model_path: str,
                       splits: SplitData, stage_dir: Path, parent_run_id: str | None = None,
                       callbacks: list | None = None, plan: TrainingPlan | None = None) -> RewardResult:
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tokenizer = load_tokenizer(model_path, model)
    plan = plan or default_plan(f"reward-{aspect}", "reward", settings, model, model_path, splits.train.rows)

    def make_trainer(plan: TrainingPlan) -> RewardTrainer:
        network = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, **plan.load_kwargs(model))
        network.config.pad_token_id = tokenizer.pad_token_id
        return RewardTrainer(
            model=network,
            args=RewardConfig(**settings.trainer_args(stage_dir / "checkpoints", plan, f"reward-{aspect}")),
            train_dataset=load_pairs(splits.train.path),
            eval_dataset=load_pairs(splits.eval.path),
            processing_class=tokenizer,
            peft_config=settings.lora.peft_config("SEQ_CLS"),
            callbacks=callbacks,
        )

    with stage_run(f"reward-{aspect}", parent_run_id) as run:
        trainer, metrics = fit(make_trainer, plan, stage_dir)
        adapter_dir = stage_dir / "adapter"
        trainer.save_model(str(adapter_dir))
        model_dir = merge_into_base(model_path, [str(adapter_dir)], stage_dir / "model", head="sequence-classification")
        return RewardResult(aspect=aspect, weight=settings.weight, eval_path=splits.eval.path, model_dir=model_dir,
                            adapter_dir=str(adapter_dir), metrics=metrics, mlflow_run_id=run.info.run_id)


@training_task("train-reward-model", task_run_name="reward-{aspect}")
def train_reward(aspect: str, settings: RewardSettings, model: ModelSettings, model_path: str, splits: SplitData,
                 plan: TrainingPlan, workspace: Workspace, parent_run_id: str | None = None) -> RewardResult:
    stage_dir = workspace.stage(f"reward-{aspect}", settings, model, model_path, splits, plan.result_key())
    return train_reward_model(aspect, settings, model, model_path, splits, stage_dir, parent_run_id, plan=plan)
