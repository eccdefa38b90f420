"""One training stage's trainer, specified once and built in one place.

Each stage kind (reward model, SFT, policy) turns its settings into a `TrainerSpec`: the TRL trainer
and config class, the config's arguments under TRL's names, the model and how it loads, the data, the
LoRA adapter and, for online methods, the reward models. `build_trainer(spec, plan, ...)` makes the
trainer from it, in this process or in each launched rank (the spec travels to them as it is).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from tasks.base import PreftuneError
from tasks.methods import DataShape, load_class
from tasks.models import ResolvedModel
from tasks.plan import TrainingPlan
from tasks.settings.models import LoraSettings
from tasks.settings.training import TrainerSettings
from tasks.stages import policy_stage, training_stages


class RewardFunction(BaseModel):
    """A reward model an online method scores its generations with, and its share of the reward (the
    evaluation's `Judge` is one, with where its verdict comes from)."""

    aspect: str
    model: str  # a folder or hub id of a sequence-classification model
    weight: float


class TrainerSpec(BaseModel):
    """Everything a stage's trainer is built from; plain data, so it ships to launched ranks as JSON."""

    stage: str
    trainer: str  # import path of the TRL trainer class
    config: str  # import path of its config class
    arguments: dict[str, Any]  # the config's arguments under TRL's names; the plan adds its own at build time
    model: ResolvedModel  # tokenizer and loading settings
    weights: str  # the folder or hub id whose weights load (a judge's: the base as a classifier)
    head: Literal["CAUSAL_LM", "SEQ_CLS"] = "CAUSAL_LM"
    train_data: str
    eval_data: str | None = None  # only when the trainer's own held-out pass is asked for
    data_shape: DataShape = "pairs"
    lora: LoraSettings
    rewards: list[RewardFunction] = []
    overlong_penalty_tokens: int | None = None
    seed: int
    keep_checkpoints: bool

    @classmethod
    def of(
        cls,
        settings: TrainerSettings,
        *,
        stage: str,
        config: str,
        model: ResolvedModel,
        train_data: str,
        eval_data: str,
        defaults: dict | None = None,
        weights: str | None = None,
        **fields,
    ) -> TrainerSpec:
        """A stage's spec with what every stage takes from its settings: the TRL arguments (checked), the
        adapter, the seed, whether checkpoints stay, and held-out data only when the trainer's own pass is
        asked for (DPO and KTO would precompute their log-probs for nothing)."""
        return cls(
            stage=stage,
            config=config,
            arguments=config_arguments(settings, config, stage, defaults),
            model=model,
            weights=weights or model.path,
            train_data=train_data,
            eval_data=eval_data if settings.evaluate_after_training else None,
            lora=settings.lora,
            seed=settings.seed,
            keep_checkpoints=settings.keep_checkpoints,
            **fields,
        )


def config_fields(config: str) -> set[str]:
    """What a TRL config class accepts as arguments."""
    return {field.name for field in dataclasses.fields(load_class(config)) if field.init}


def config_arguments(settings: TrainerSettings, config: str, where: str, defaults: dict | None = None) -> dict:
    """The settings under TRL's names, over the method's `defaults`: the fields the config class has.
    Declared settings it lacks are ours (lora, keep_checkpoints, ...); an undeclared key it lacks is a
    typo, named here: the one check of TRL options (`check_options` runs it for every stage first)."""
    fields = config_fields(config)
    if unknown := sorted(set(settings.model_extra or {}) - fields):
        raise PreftuneError(
            f"{where}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"({config.rsplit('.', 1)[-1]} has no such field)"
        )
    values = (defaults or {}) | settings.model_dump(exclude={"gradient_checkpointing"})  # the plan decides it
    return {key: value for key, value in values.items() if key in fields}


def check_options(config) -> None:
    """Every training stage's settings, and each `methods.<name>` entry, against its TRL config class:
    the flow's first step, so a typo fails by name before anything loads or trains."""
    for stage in [*training_stages(config), *(policy_stage(config, name) for name in config.methods)]:
        config_arguments(stage.settings, stage.config, stage.key, stage.defaults)


def load_pairs(path: str, shape: DataShape = "pairs"):
    """A conversational file (written by tasks/data.py) as a `datasets.Dataset` in the shape the trainer
    takes, without the columns that are for evaluation only (a row's IFEval instructions)."""
    from datasets import load_dataset

    from tasks.schemas import INSTRUCTION_COLUMNS

    pairs = load_dataset("json", data_files=path, split="train")
    pairs = pairs.remove_columns([name for name in INSTRUCTION_COLUMNS if name in pairs.column_names])
    if shape == "unpaired":
        from trl.data_utils import unpair_preference_dataset

        return unpair_preference_dataset(pairs)
    return pairs.select_columns(["prompt"]) if shape == "prompts" else pairs


def online_rewards(spec: TrainerSpec, arguments: dict) -> tuple[dict, list[str]]:
    """The reward functions and weights of an online method (TRL's `reward_funcs`, `reward_weights`), and
    their names; with `overlong_penalty_tokens`, TRL's soft overlong punishment (DAPO) as one more."""
    functions, names = [reward.model for reward in spec.rewards], [reward.aspect for reward in spec.rewards]
    arguments["reward_weights"] = [reward.weight for reward in spec.rewards]
    if spec.overlong_penalty_tokens:
        from trl.rewards import get_soft_overlong_punishment

        limit = arguments.get("max_completion_length") or load_class(spec.config)().max_completion_length
        functions.append(get_soft_overlong_punishment(limit, spec.overlong_penalty_tokens))
        arguments["reward_weights"].append(1.0)
        names.append("overlong")
    return {"reward_funcs": functions}, names


def build_trainer(spec: TrainerSpec, plan: TrainingPlan, output_dir: Path, callbacks: list | None = None):
    """The stage's TRL trainer for this plan: the config (before the model: ZeRO-3 must know it when the
    weights load), the model, the adapter, the data."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    arguments = (
        spec.arguments
        | plan.trainer_overrides()
        | dict(output_dir=str(output_dir), run_name=spec.stage, save_strategy="steps", report_to=[], disable_tqdm=False)
    )
    online, names = online_rewards(spec, arguments) if spec.rewards else ({}, [])
    try:
        args = load_class(spec.config)(**arguments)
    except (TypeError, ValueError) as error:  # e.g. a batch that num_generations does not divide
        raise PreftuneError(f"{spec.stage} settings: {error}") from None
    auto = AutoModelForSequenceClassification if spec.head == "SEQ_CLS" else AutoModelForCausalLM
    # A causal LM loaded with a new score head, or an online method's judges (each adapter brings its
    # head): TRL's own silencing of the warning.
    with suppress_seqcls_warning():
        network = auto.from_pretrained(spec.weights, **plan.load_kwargs(spec.model.settings))
        trainer = load_class(spec.trainer)(
            model=network,
            args=args,
            train_dataset=load_pairs(spec.train_data, spec.data_shape),
            eval_dataset=load_pairs(spec.eval_data, spec.data_shape) if spec.eval_data else None,
            processing_class=spec.model.tokenizer(),
            callbacks=callbacks,
            peft_config=spec.lora.peft_config(spec.head, network.config.num_hidden_layers),
            **online,
        )
    if names:  # TRL names each reward by its folder (all ours are `peft`): name them by aspect
        trainer.reward_func_names = names
    return trainer
