"""Preference methods: one row per method, and the one place that knows TRL's trainers.

A row says which TRL trainer and config class train the method, what data it takes (preference
pairs, unpaired thumbs-up/down rows, or prompts only), whether it needs a reference model (the
adapter switched off) or scores its own generations with the aspects' reward models, which implicit
reward evaluation can compute, and the config values that make the method (e.g. a DPO loss type).
The training task (tasks/policy.py) runs any row; the flow names no method.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Literal

from tasks.base import PreftuneError

DataShape = Literal["pairs", "unpaired", "prompts"]
# How evaluation scores a held-out pair without a judge: log pi/pi_ref (DPO, KTO), the policy's mean
# token log-probability (reference-free ORPO/SimPO), or nothing (online RL: judged by reward models only).
ImplicitReward = Literal["log_ratio", "mean_logp"] | None


@dataclass(frozen=True, kw_only=True)
class Method:
    trainer: str  # import path of the TRL trainer class
    config: str  # import path of its config class
    data: DataShape
    reference: bool  # KL to / log-ratio against the starting model
    online: bool  # generates on the training prompts and is scored by the aspects' reward models
    implicit_reward: ImplicitReward
    defaults: dict = field(default_factory=dict)  # config values that make the method; a profile may override them
    plan_kind: str = "dpo"  # the memory model in tasks/plan.py


METHODS: dict[str, Method] = {
    "dpo": Method(
        trainer="trl.DPOTrainer",
        config="trl.DPOConfig",
        data="pairs",
        reference=True,
        online=False,
        implicit_reward="log_ratio",
    ),
    "ipo": Method(
        trainer="trl.DPOTrainer",
        config="trl.DPOConfig",
        data="pairs",
        reference=True,
        online=False,
        implicit_reward="log_ratio",
        defaults={"loss_type": ["ipo"]},
    ),
    "kto": Method(
        trainer="trl.KTOTrainer",
        config="trl.KTOConfig",
        data="unpaired",
        reference=True,
        online=False,
        implicit_reward="log_ratio",
        plan_kind="kto",
    ),
    "orpo": Method(
        trainer="trl.experimental.orpo.ORPOTrainer",
        config="trl.experimental.orpo.ORPOConfig",
        data="pairs",
        reference=False,
        online=False,
        implicit_reward="mean_logp",
        plan_kind="pairs",
    ),
    "simpo": Method(
        trainer="trl.experimental.cpo.CPOTrainer",
        config="trl.experimental.cpo.CPOConfig",
        data="pairs",
        reference=False,
        online=False,
        implicit_reward="mean_logp",
        defaults={"loss_type": "simpo", "cpo_alpha": 0.0},
        plan_kind="pairs",
    ),
    "rloo": Method(
        trainer="trl.RLOOTrainer",
        config="trl.RLOOConfig",
        data="prompts",
        reference=True,
        online=True,
        implicit_reward=None,
        defaults={"num_generations": 4},
        plan_kind="online",
    ),
    "grpo": Method(
        trainer="trl.GRPOTrainer",
        config="trl.GRPOConfig",
        data="prompts",
        reference=True,
        online=True,
        implicit_reward=None,
        defaults={"num_generations": 4, "beta": 0.04},
        plan_kind="online",
    ),
}
# PPO is not offered: TRL 1.16 has no PPO trainer (trl.experimental.ppo is gone); rloo and grpo are its
# online successors there.


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise PreftuneError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def load_class(path: str):
    """A class from its import path (trainers are imported only when a stage needs them)."""
    module, _, name = path.rpartition(".")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # experimental trainers are chosen knowingly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), name)
