"""The policy stage: any preference method of tasks/methods.py, as a LoRA adapter (QLoRA where 4-bit).

The method's row picks the TRL trainer and config, the shape its data takes (pairs, unpaired rows or
prompts) and whether it scores its own generations with the aspects' reward models. With
`peft_config`, the reference model is the same weights with the adapter switched off, as in the
recipe, so no second copy of the model is held in memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pydantic import BaseModel, Field

from tasks.base import PreftuneError, Workspace
from tasks.caching import code_fingerprint
from tasks.data import SplitData
from tasks.distributed import DistributedSettings
from tasks.methods import Method, method_named
from tasks.models import ResolvedModel
from tasks.plan import TrainingPlan, default_plan
from tasks.tracking import stage_run
from tasks.training import TrainerSettings, fit, load_pairs, training_task


class PolicySettings(TrainerSettings):
    """Our common trainer settings; any other key is an option of the method's TRL config under TRL's
    name (`beta`, `loss_type`, `num_generations`, ...), checked against that class. Length control
    where TRL has one: DPO's `ld_alpha` (down-weights the log-probabilities of the longer answer's
    extra tokens), SimPO's length-normalised reward, and for online methods `overlong_penalty_tokens`."""

    own_fields = TrainerSettings.own_fields | {"overlong_penalty_tokens"}

    overlong_penalty_tokens: int | None = Field(
        None, gt=0, description="Online methods (rloo, grpo): penalise completions that run into the last this-many "
                                "tokens before max_completion_length (TRL's soft overlong punishment, DAPO).")


class RewardFunction(BaseModel):
    """A reward model an online method scores its generations with, and its share of the reward."""

    aspect: str
    model: str  # a folder or hub id of a sequence-classification model
    weight: float


class PolicyResult(BaseModel):
    method: str
    adapter_dir: str
    metrics: dict[str, float]  # the trainer's held-out pass, when asked for
    mlflow_run_id: str


def config_arguments(method: Method, settings: PolicySettings, output_dir: Path, plan: TrainingPlan,
                     run_name: str) -> dict:
    """The method's values, then the profile's, then the plan's: one dict for the TRL config."""
    arguments = method.defaults | settings.trainer_args(output_dir, plan, run_name)
    return {key: value for key, value in arguments.items() if key not in method.data_only}


def dataset_for(method: Method, path: str):
    """The formatted preference pairs in the shape the method trains on."""
    pairs = load_pairs(path)
    if method.data == "unpaired":
        from trl.data_utils import unpair_preference_dataset

        return unpair_preference_dataset(pairs)
    if method.data == "prompts":
        return pairs.select_columns(["prompt"])
    return pairs


def policy_trainer(method_name: str, settings: PolicySettings, model: ResolvedModel, splits: SplitData,
                   stage_dir: Path, rewards: list[RewardFunction], callbacks: list | None = None
                   ) -> Callable[[TrainingPlan], object]:
    """The method's TRL trainer for a plan (built in each process that trains)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    method = method_named(method_name)
    tokenizer = model.tokenizer()
    train_data = dataset_for(method, splits.train.path)
    # Only a trainer that evaluates gets held-out pairs: DPO and KTO would precompute their log-probs for nothing.
    eval_data = dataset_for(method, splits.eval.path) if settings.evaluate_after_training else None

    def make_trainer(plan: TrainingPlan):
        arguments = config_arguments(method, settings, stage_dir / "checkpoints", plan, method_name)
        online = {"reward_funcs": [reward.model for reward in rewards]} if method.online else {}
        names = [reward.aspect for reward in rewards]
        if method.online:
            arguments["reward_weights"] = [reward.weight for reward in rewards]
            if settings.overlong_penalty_tokens:
                from trl.rewards import get_soft_overlong_punishment

                limit = arguments.get("max_completion_length") or method.config_class()().max_completion_length
                online["reward_funcs"].append(get_soft_overlong_punishment(limit, settings.overlong_penalty_tokens))
                arguments["reward_weights"].append(1.0)
                names.append("overlong")
        try:
            args = method.config_class()(**arguments)
        except (TypeError, ValueError) as error:  # e.g. a batch that num_generations does not divide
            raise PreftuneError(f"policy settings for {method_name}: {error}") from None
        network = AutoModelForCausalLM.from_pretrained(model.path, **plan.load_kwargs(model.settings))
        with suppress_seqcls_warning():  # online methods load their judges here: each adapter brings its score head
            trainer = method.trainer_class()(
                model=network, args=args, train_dataset=train_data, eval_dataset=eval_data, processing_class=tokenizer,
                peft_config=settings.lora.peft_config("CAUSAL_LM", network.config.num_hidden_layers),
                callbacks=callbacks, **online)
        if method.online:  # TRL names each reward by its folder (all ours are `peft`): name them by aspect
            trainer.reward_func_names = names
        return trainer

    return make_trainer


def train_policy_adapter(method_name: str, settings: PolicySettings, model: ResolvedModel, splits: SplitData,
                         stage_dir: Path, parent_run_id: str | None = None, rewards: list[RewardFunction] = (),
                         callbacks: list | None = None, plan: TrainingPlan | None = None,
                         distributed: DistributedSettings | None = None) -> PolicyResult:
    method = method_named(method_name)
    if method.online and not rewards:
        raise PreftuneError(f"{method_name} scores its generations with reward models: give at least one aspect")
    if given := [reward.aspect for reward in rewards if reward.model.startswith("models:/")]:
        raise PreftuneError(f"{method_name} loads its reward models from folders or hub ids; rewards "
                            f"{', '.join(given)} name a models:/ URI (download it with `mlflow artifacts download`)")
    plan = plan or default_plan(method_name, method.plan_kind, settings, model, splits.train.rows, distributed)
    with stage_run(method_name, parent_run_id) as run:
        fitted = fit(policy_trainer, settings, plan, stage_dir, distributed, method_name=method_name,
                           model=model, splits=splits, rewards=list(rewards), callbacks=callbacks)
        return PolicyResult(method=method_name, adapter_dir=fitted.adapter_dir, metrics=fitted.metrics,
                            mlflow_run_id=run.info.run_id)


@training_task("train-policy", task_run_name="train-{method}")
def train_policy(method: str, settings: PolicySettings, model: ResolvedModel, splits: SplitData,
                 plan: TrainingPlan, rewards: list[RewardFunction], workspace: Workspace,
                 parent_run_id: str | None = None, distributed: DistributedSettings | None = None) -> PolicyResult:
    stage_dir = workspace.stage(method, settings, model, splits, rewards, plan.result_key(),
                                code_fingerprint(__name__))
    return train_policy_adapter(method, settings, model, splits, stage_dir, parent_run_id, rewards,
                                plan=plan, distributed=distributed)
