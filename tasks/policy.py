"""The policy stage: any preference method of tasks/methods.py, as a LoRA adapter (QLoRA where 4-bit).

The method's row picks the TRL trainer and config, the shape its data takes (pairs, unpaired rows or
prompts) and whether it scores its own generations with the aspects' reward models. With
`peft_config`, the reference model is the same weights with the adapter switched off, as in the
recipe, so no second copy of the model is held in memory.
"""

from __future__ import annotations

from pathlib import Path

from tasks.base import PreftuneError
from tasks.caching import stage_folder
from tasks.data import SplitData
from tasks.distributed import DistributedSettings
from tasks.methods import method_named
from tasks.models import ResolvedModel
from tasks.plan import TrainingPlan, default_plan
from tasks.run_context import RunContext
from tasks.settings.training import PolicySettings
from tasks.trainer import RewardFunction, TrainerSpec
from tasks.training import FitResult, fit, training_task


def policy_spec(
    method_name: str,
    settings: PolicySettings,
    model: ResolvedModel,
    splits: SplitData,
    rewards: list[RewardFunction] = (),
) -> TrainerSpec:
    """The method's trainer: its TRL classes, its defaults under the profile's settings, its data shape."""
    method = method_named(method_name)
    if method.online and not rewards:
        raise PreftuneError(f"{method_name} scores its generations with reward models: give at least one aspect")
    if given := [reward.aspect for reward in rewards if reward.model.startswith("models:/")]:
        raise PreftuneError(
            f"{method_name} loads its reward models from folders or hub ids; rewards "
            f"{', '.join(given)} name a models:/ URI (download it with `mlflow artifacts download`)"
        )
    return TrainerSpec.of(
        settings,
        stage=method_name,
        trainer=method.trainer,
        config=method.config,
        defaults=method.defaults,
        model=model,
        train_data=splits.train.path,
        eval_data=splits.eval.path,
        data_shape=method.data,
        rewards=list(rewards) if method.online else [],
        overlong_penalty_tokens=settings.overlong_penalty_tokens,
    )


def train_policy_adapter(
    method: str,
    settings: PolicySettings,
    model: ResolvedModel,
    splits: SplitData,
    stage_dir: Path,
    *,
    rewards: list[RewardFunction] = (),
    plan: TrainingPlan | None = None,
    distributed: DistributedSettings | None = None,
    callbacks: list | None = None,
) -> FitResult:
    """Train the policy's adapter in `stage_dir` (the task below picks the folder by the stage's key)."""
    spec = policy_spec(method, settings, model, splits, rewards)
    plan = plan or default_plan(method, method_named(method).plan_kind, settings, model, splits.train.rows, distributed)
    return fit(spec, plan, stage_dir, distributed, callbacks)


@training_task("train-policy", task_run_name="train-{method}")
def train_policy(
    *,
    method: str,
    settings: PolicySettings,
    model: ResolvedModel,
    splits: SplitData,
    plan: TrainingPlan,
    rewards: list[RewardFunction],
    run: RunContext,
) -> FitResult:
    return train_policy_adapter(
        method,
        settings,
        model,
        splits,
        stage_folder(run.workspace, method),
        rewards=rewards,
        plan=plan,
        distributed=run.distributed,
    )
