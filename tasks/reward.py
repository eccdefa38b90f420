"""Reward models: TRL's RewardTrainer with a LoRA adapter and a scalar (SEQ_CLS) head.

One model per aspect (helpfulness, harmlessness, ...), each on its own data and backbone if set.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel

from tasks import stages
from tasks.caching import stage_folder
from tasks.data import SplitData
from tasks.distributed import DistributedSettings
from tasks.merge import MERGING
from tasks.models import ResolvedModel, judge_base
from tasks.plan import TrainingPlan, default_plan
from tasks.run_context import RunContext
from tasks.settings.training import RewardSettings
from tasks.tracking import adapter_folder, save_mlflow_model
from tasks.trainer import TrainerSpec
from tasks.training import FitResult, fit, training_task

log = logging.getLogger(__name__)


class RewardResult(BaseModel):
    aspect: str
    weight: float
    eval_path: str  # this aspect's held-out pairs
    model_dir: str  # the adapter and score head inside an MLflow model over the judge base: scores, gets registered
    train_pairs: int  # pairs in the aspect's train split
    fit: FitResult  # what training left (the trainer used fit.train_examples of train_pairs)

    def metrics(self) -> dict[str, float]:
        """What the recording step logs beside the curves."""
        return {"train_pairs": self.train_pairs, "train_pairs_used": self.fit.train_examples}


def reward_spec(aspect: str, settings: RewardSettings, model: ResolvedModel, splits: SplitData) -> TrainerSpec:
    """TRL's RewardTrainer on the aspect's pairs, over the base as a one-label classifier."""
    return TrainerSpec.of(
        settings,
        stage=stages.reward(aspect),
        trainer="trl.RewardTrainer",
        config=stages.REWARD_CONFIG,
        model=model,
        weights=judge_base(model),
        head="SEQ_CLS",
        train_data=splits.train.path,
        eval_data=splits.eval.path,
    )


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


def train_reward_model(
    aspect: str,
    settings: RewardSettings,
    model: ResolvedModel,
    splits: SplitData,
    stage_dir: Path,
    *,
    plan: TrainingPlan | None = None,
    distributed: DistributedSettings | None = None,
    callbacks: list | None = None,
) -> RewardResult:
    """Train the aspect's reward model in `stage_dir`, and save it as an MLflow model (the judge)."""
    spec = reward_spec(aspect, settings, model, splits)
    plan = plan or default_plan(spec.stage, "reward", settings, model, splits.train.rows, distributed)
    fitted = fit(spec, plan, stage_dir, distributed, callbacks)
    if fitted.train_examples < splits.train.rows:
        log.warning("%s: the trainer used %d of %d train pairs", spec.stage, fitted.train_examples, splits.train.rows)
    model_dir = save_judge(model, Path(fitted.adapter_dir), stage_dir / "model")
    return RewardResult(
        aspect=aspect,
        weight=settings.weight,
        eval_path=splits.eval.path,
        model_dir=model_dir,
        train_pairs=splits.train.rows,
        fit=fitted,
    )


@training_task("train-reward-model", task_run_name="reward-{aspect}")
def train_reward(
    *,
    aspect: str,
    settings: RewardSettings,
    model: ResolvedModel,
    splits: SplitData,
    plan: TrainingPlan,
    run: RunContext,
) -> RewardResult:
    return train_reward_model(
        aspect,
        settings,
        model,
        splits,
        stage_folder(run.workspace, stages.reward(aspect)),
        plan=plan,
        distributed=run.distributed,
    )
