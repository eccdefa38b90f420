"""A run's judges: each reward aspect's model (trained here on pairs the policy never saw, or given),
and the referees, which are no training reward. What each judge has earned is decided in tasks/verdict.py."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from tasks.base import Workspace, redact
from tasks.data import SplitData
from tasks.evaluate import Judge
from tasks.models import ResolvedModel, resolve_base_model
from tasks.prepare import PreparedData, prepare_judge_data
from tasks.reward import RewardResult
from tasks.settings.data import DataSettings
from tasks.settings.evaluation import EvalSettings
from tasks.settings.training import RewardSettings


class Aspect(BaseModel):
    """One reward aspect, ready to train (or given): its model and its pairs."""

    name: str
    settings: RewardSettings
    model: ResolvedModel
    pairs: SplitData
    provenance: str

    @property
    def trains(self) -> bool:
        return not self.settings.judge


def prepare_aspect(
    name: str,
    settings: RewardSettings,
    policy_model: ResolvedModel,
    pipeline: PreparedData,
    pipeline_data: DataSettings,
    workspace: Workspace,
) -> Aspect:
    model = resolve_base_model(settings.model) if settings.model else policy_model
    if settings.judge:  # given: its held-out pairs are its own data's, or the policy's
        pairs = (
            prepare_judge_data(name, settings.data, model, settings.max_length, pipeline, pipeline_data, workspace)
            if settings.data
            else pipeline.formatted
        )
        return Aspect(
            name=name, settings=settings, model=model, pairs=pairs, provenance=f"given: {redact(settings.judge)}"
        )
    pairs = prepare_judge_data(name, settings.data, model, settings.max_length, pipeline, pipeline_data, workspace)
    provenance = (
        f"trained on {pairs.train.rows} pairs whose questions the policy never saw"
        if settings.data is None
        else f"trained on {pairs.train.rows} pairs of its own data ({Path(settings.data.source).name})"
    )
    return Aspect(name=name, settings=settings, model=model, pairs=pairs, provenance=provenance)


def judges_of(aspects: list[Aspect], trained: dict[str, RewardResult], training_reward: bool = False) -> list[Judge]:
    """Each aspect's judge: the reward model trained for it, or the one it was given. `training_reward`:
    the policy is trained against them (online methods), so they cannot certify it."""
    judges = []
    for aspect in aspects:
        if reward := trained.get(aspect.name):
            judges.append(
                Judge(
                    aspect=aspect.name,
                    weight=reward.weight,
                    model=reward.model_dir,
                    eval_path=reward.eval_path,
                    provenance=aspect.provenance,
                    training_reward=training_reward,
                )
            )
        else:
            judges.append(
                Judge(
                    aspect=aspect.name,
                    weight=aspect.settings.weight,
                    model=aspect.settings.judge,
                    eval_path=aspect.pairs.eval.path,
                    provenance=aspect.provenance,
                    training_reward=training_reward,
                )
            )
    return judges


def referees_of(settings: EvalSettings, eval_path: str) -> list[Judge]:
    """The referees: judges that are no training reward, earning their say on the policy's held-out pairs."""
    return [
        Judge(
            aspect=name,
            weight=referee.weight,
            model=referee.model,
            eval_path=eval_path,
            provenance=f"referee, given: {redact(referee.model)}",
            referee=True,
        )
        for name, referee in settings.referees.items()
    ]
