"""Stage names, in one place. A stage's name is its folder in the run's workspace, its MLflow child
run's name and `preftune.stage` tag, and its key in the training plan; the policy stage is named after
its method (`dpo`, `grpo`, ...), the data prepared for a stage after the stage that consumes it."""

from __future__ import annotations

from typing import NamedTuple

from tasks.methods import method_named
from tasks.settings.models import ModelSettings

DATA = "data"  # the pipeline's own pairs (the policy's)
SFT = "sft"
EVALUATE = "evaluate"


def reward(aspect: str) -> str:
    """The reward model of one aspect (`reward-helpfulness`)."""
    return f"reward-{aspect}"


def data_for(consumer: str) -> str:
    """Pairs of a stage's own source (`data-sft`, `data-helpfulness`)."""
    return f"{DATA}-{consumer}"


def judge_data(aspect: str) -> str:
    """The pipeline's questions set aside for one aspect's judge (`data-judge-helpfulness`)."""
    return f"{DATA}-judge-{aspect}"


REWARD_CONFIG, SFT_CONFIG = "trl.RewardConfig", "trl.SFTConfig"


class TrainingStage(NamedTuple):
    name: str
    kind: str  # the memory model in tasks/plan.py
    settings: object  # the stage's TrainerSettings
    model: ModelSettings  # the backbone it trains
    config: str  # import path of its TRL config class
    key: str  # where its settings are in the config (`rewards.helpfulness`, `policy (method dpo)`)
    aspect: str | None = None  # reward stages: the aspect
    defaults: dict = {}  # config values that make the method (the policy stage)


def training_stages(config) -> list[TrainingStage]:
    """Every stage a `PipelineConfig` trains, in the order they run: the reward model of each aspect not
    given a judge, SFT when enabled, then the policy (named after its method)."""
    found = [
        TrainingStage(
            reward(aspect),
            "reward",
            settings,
            settings.model or config.model,
            REWARD_CONFIG,
            f"rewards.{aspect}",
            aspect,
        )
        for aspect, settings in config.rewards.items()
        if not settings.judge
    ]
    if config.sft.enabled:
        found.append(TrainingStage(SFT, "sft", config.sft, config.model, SFT_CONFIG, "sft"))
    return found + [policy_stage(config, config.method)]


def policy_stage(config, method_name: str) -> TrainingStage:
    """The policy stage as it would run with `method_name` (its `methods.<name>` settings over `policy`)."""
    method = method_named(method_name)
    runs = method_name == config.method
    return TrainingStage(
        method_name,
        method.plan_kind,
        config.model_copy(update={"method": method_name}).policy_settings(),
        config.model,
        method.config,
        f"policy (method {method_name})" if runs else f"methods.{method_name}",
        defaults=method.defaults,
    )
