"""Reward models: TRL's RewardTrainer with a LoRA adapter and a scalar (SEQ_CLS) head.

One model per aspect (helpfulness, harmlessness, ...), each on its own data and backbone if set.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import mlflow
from pydantic import BaseModel, Field

from tasks import stages
from tasks.base import MayHoldCredentials, Workspace
from tasks.caching import code_fingerprint
from tasks.data import DataSettings, SplitData
from tasks.distributed import DistributedSettings
from tasks.merge import MERGING
from tasks.models import ModelSettings, ResolvedModel, judge_base
from tasks.plan import TrainingPlan, default_plan
from tasks.tracking import adapter_folder, save_mlflow_model, stage_run
from tasks.training import TrainerSettings, fit, load_pairs, training_task


log = logging.getLogger(__name__)


class RewardSettings(TrainerSettings):
    """One reward aspect's judge: trained with TRL's `RewardTrainer` (other keys: `RewardConfig`'s options),
    or given as an existing model."""

    own_fields = TrainerSettings.own_fields | {"weight", "data", "model", "judge"}
    trl_config = "trl.RewardConfig"

    learning_rate: float = Field(1e-4, description="Peak learning rate of the schedule.")
    weight: float = Field(1.0, gt=0, description="This aspect's share of the combined score.")
    data: DataSettings | None = Field(None, description=(
        "This aspect's own preference pairs; empty: the judges' share of the pipeline's data (questions the "
        "policy never sees)."))
    model: ModelSettings | None = Field(None, description="The judge's backbone; empty: the policy's base model "
                                                          "(a small encoder also works).")
    judge: MayHoldCredentials | None = Field(None, description="A sequence-classification model to judge with instead of "
                                                "training one: folder, Hub id or models:/ URI.")


class RewardResult(BaseModel):
    aspect: str
    weight: float
    eval_path: str  # this aspect's held-out pairs
    model_dir: str  # the adapter and score head inside an MLflow model over the judge base: scores, gets registered
    adapter_dir: str
    train_pairs: int  # pairs the trainer used (all of the split: overlong ones were shortened, not dropped)
    metrics: dict[str, float]
    mlflow_run_id: str


def reward_trainer(aspect: str, settings: RewardSettings, model: ResolvedModel, splits: SplitData, stage_dir: Path,
                   callbacks: list | None = None) -> Callable[[TrainingPlan], object]:
    """TRL's RewardTrainer for a plan (built in each process that trains)."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    tokenizer, base = model.tokenizer(), judge_base(model)

    def make_trainer(plan: TrainingPlan) -> RewardTrainer:
        args = RewardConfig(**settings.trainer_args(stage_dir / "checkpoints", plan, stages.reward(aspect)))
        with suppress_seqcls_warning():  # a causal LM loaded with a new score head: TRL's own silencing of it
            network = AutoModelForSequenceClassification.from_pretrained(base, **plan.load_kwargs(model.settings))
        return RewardTrainer(
            model=network,
            args=args,  # created before the model: ZeRO-3 must know it when the weights load
            train_dataset=load_pairs(splits.train.path),
            eval_dataset=load_pairs(splits.eval.path),
            processing_class=tokenizer,
            peft_config=settings.lora.peft_config("SEQ_CLS", network.config.num_hidden_layers),
            callbacks=callbacks,
        )

    return make_trainer


def save_judge(model: ResolvedModel, adapter_dir: Path, output_dir: Path) -> str:
    """The trained adapter as an MLflow model over the judge base (megabytes: no merged copy of the base);
    returns its adapter folder, which `from_pretrained` loads as the full reward model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    if (adapter_folder(output_dir) / "adapter_config.json").exists():
        return str(adapter_folder(output_dir))
    base = judge_base(model)
    with MERGING, suppress_seqcls_warning():  # the adapter brings the score head
        network = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), adapter_dir)
    save_mlflow_model(network, model.tokenizer(), "text-classification", output_dir, base_model_path=base)
    return str(adapter_folder(output_dir))


def train_reward_model(aspect: str, settings: RewardSettings, model: ResolvedModel, splits: SplitData, stage_dir: Path,
                       parent_run_id: str | None = None, callbacks: list | None = None, plan: TrainingPlan | None = None,
                       distributed: DistributedSettings | None = None) -> RewardResult:
    plan = plan or default_plan(stages.reward(aspect), "reward", settings, model, splits.train.rows, distributed)
    with stage_run(stages.reward(aspect), parent_run_id) as run:
        fitted = fit(reward_trainer, settings, plan, stage_dir, distributed, aspect=aspect, model=model,
                           splits=splits, callbacks=callbacks)
        used = fitted.train_examples
        mlflow.log_metrics({"train_pairs": splits.train.rows, "train_pairs_used": used})
        if used < splits.train.rows:
            log.warning("%s: the trainer used %d of %d train pairs", stages.reward(aspect), used, splits.train.rows)
        adapter_dir = Path(fitted.adapter_dir)
        model_dir = save_judge(model, adapter_dir, stage_dir / "model")
        return RewardResult(aspect=aspect, weight=settings.weight, eval_path=splits.eval.path, model_dir=model_dir,
                            adapter_dir=str(adapter_dir), train_pairs=used, metrics=fitted.metrics,
                            mlflow_run_id=run.info.run_id)


@training_task("train-reward-model", task_run_name="reward-{aspect}")
def train_reward(aspect: str, settings: RewardSettings, model: ResolvedModel, splits: SplitData,
                 plan: TrainingPlan, workspace: Workspace, parent_run_id: str | None = None,
                 distributed: DistributedSettings | None = None) -> RewardResult:
    stage_dir = workspace.stage(stages.reward(aspect), settings, model, splits, plan.result_key(),
                                code_fingerprint(__name__))
    return train_reward_model(aspect, settings, model, splits, stage_dir, parent_run_id, plan=plan,
                              distributed=distributed)
