"""PipelineConfig: every stage's settings in one typed object, built from a YAML profile.

The same object is the flow's parameter, so the Prefect UI renders it as a form and a deployment's
parameters are validated by the same rules as the CLI's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, StringConstraints, ValidationError, field_validator, model_validator

from tasks.base import PreftuneError, StrictModel
from tasks.data import DataSettings
from tasks.distributed import DistributedSettings
from tasks.evaluate import EvalSettings
from tasks.merge import MergeSettings
from tasks.methods import METHODS, method_named, unknown_options
from tasks.models import ModelSettings
from tasks.plan import PlanSettings
from tasks.policy import PolicySettings
from tasks.reward import RewardSettings
from tasks.sft import SFTSettings
from tasks.tracking import TrackingSettings
from tasks.training import unknown_message

AspectName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]*$")]

PROFILES_DIR = Path(__file__).resolve().parent.parent / "configs"


class PipelineConfig(StrictModel):
    """Settings given explicitly are applied over the named profile's YAML, so a deployment's
    parameters or a UI form only need what differs (e.g. `{profile: book, dpo: {max_steps: 50}}`)."""

    profile: str = "quickstart"
    # None: the profile's name; stages inside are keyed by their inputs. A plain name, never a path.
    run_name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] | None = None
    # Where runs are written; with PREFTUNE_RUNS_ROOT set (workers, deployments), it must lie inside it.
    runs_dir: str = "runs"
    data_root: str = "."  # relative local data files (data.source and the aspects' sources) are read from here
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    plan: PlanSettings = Field(default_factory=PlanSettings)  # auto: fitted to the device; recipe: verbatim
    # Processes per training stage and how they share the model (accelerate: ddp, fsdp, deepspeed_zero2/3).
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    # Train the independent stages (reward aspects, SFT) at the same time, each in a process of its own.
    # None: when several GPUs are visible (each stage then gets its own); off on a CPU, whose cores one stage fills.
    parallel_stages: bool | None = None
    # One reward model per aspect; a profile's aspects are kept and given ones are added or updated.
    rewards: dict[AspectName, RewardSettings] = Field(default_factory=lambda: {"helpfulness": RewardSettings()},
                                                      min_length=1)
    sft: SFTSettings = Field(default_factory=SFTSettings)
    # The preference method (tasks/methods.py) and its trainer's settings; TRL options under TRL's names.
    method: Literal[tuple(METHODS)] = "dpo"
    policy: PolicySettings = Field(default_factory=PolicySettings)
    # Settings for one method only, applied over `policy` when that method runs (e.g. grpo's num_generations).
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)

    @model_validator(mode="before")
    @classmethod
    def _start_from_profile(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        profile = values.get("profile", "quickstart")
        if profile not in profile_names():
            raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(profile_names())}")
        return _merge(_read_yaml(PROFILES_DIR / f"{profile}.yaml"), values) | {"profile": profile}

    @field_validator("runs_dir")
    @classmethod
    def _inside_the_runs_root(cls, value: str) -> str:
        if ".." in Path(value).parts:
            raise ValueError("runs_dir may not contain '..'")
        root = os.environ.get("PREFTUNE_RUNS_ROOT")
        if root and not Path(value).expanduser().resolve().is_relative_to(Path(root).expanduser().resolve()):
            raise ValueError(f"runs_dir must lie inside PREFTUNE_RUNS_ROOT ({root})")
        return value

    @model_validator(mode="after")
    def _judges_need_their_own_questions(self) -> "PipelineConfig":
        shared = [name for name, reward in self.rewards.items() if reward.data is None and reward.judge is None]
        if shared and not self.data.judge_fraction:
            raise ValueError(f"rewards {', '.join(shared)} train on the pipeline's data: set data.judge_fraction "
                             "(e.g. 0.3) so they judge the policy on questions it never trained on, or give them "
                             "their own data or a judge model")
        return self

    @model_validator(mode="after")
    def _judges_named_once(self) -> "PipelineConfig":
        if both := sorted(set(self.evaluation.referees) & set(self.rewards)):
            raise ValueError(f"evaluation.referees {', '.join(both)}: already a reward aspect; name the referee apart")
        safety = self.evaluation.combination.safety_aspect
        if safety and safety not in set(self.rewards) | set(self.evaluation.referees):
            raise ValueError(f"evaluation.combination.safety_aspect {safety!r}: not a reward aspect or referee "
                             f"(have {', '.join(sorted(set(self.rewards) | set(self.evaluation.referees)))})")
        return self

    @model_validator(mode="after")
    def _policy_options_known_to_the_method(self) -> "PipelineConfig":
        for name, options in self.methods.items():
            method = method_named(name)
            if unknown := unknown_options(set(options) - set(PolicySettings.model_fields), method.config_class()):
                raise ValueError(f"methods.{name}: {unknown_message(unknown, method.config)}")
        method = method_named(self.method)
        if unknown := unknown_options(set(self.policy_settings().model_extra or {}), method.config_class()):
            raise ValueError(f"policy (method {self.method}): {unknown_message(unknown, method.config)}")
        return self

    def policy_settings(self) -> PolicySettings:
        """`policy`, with the running method's own settings (`methods.<name>`) over it."""
        own = self.methods.get(self.method)
        return PolicySettings.model_validate(_merge(self.policy.model_dump(), own)) if own else self.policy

    def with_data_root(self) -> "PipelineConfig":
        """The same settings with relative local data files resolved against `data_root`."""
        def resolve(data):  # DataSettings or ChatDataSettings: anything with a `source`
            if data is None or not Path(data.source).suffix or Path(data.source).is_absolute():
                return data
            return data.model_copy(update={"source": str(Path(self.data_root).expanduser() / data.source)})

        rewards = {name: reward.model_copy(update={"data": resolve(reward.data)}) for name, reward in self.rewards.items()}
        return self.model_copy(update={"data": resolve(self.data), "rewards": rewards,
                                       "sft": self.sft.model_copy(update={"data": resolve(self.sft.data),
                                                                          "chat_data": resolve(self.sft.chat_data)})})

    def resolved_run_name(self) -> str:
        """One folder per profile by default; each stage inside it is keyed by its own inputs, so a
        change re-runs only the stages it affects."""
        return self.run_name or self.profile


def profile_names() -> list[str]:
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise PreftuneError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise PreftuneError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(content, dict):
        raise PreftuneError(f"{path}: expected a mapping of settings at the top level")
    return content


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _override(dotted: str) -> dict[str, Any]:
    """`policy.max_steps=5` -> {"policy": {"max_steps": 5}}; the value is read as YAML (numbers, lists...)."""
    key, sep, raw = dotted.partition("=")
    if not sep or not key:
        raise PreftuneError(f"--set expects key=value, got {dotted!r}")
    value: Any = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def describe_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown setting")
        elif not key:
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
        elif item["type"] == "value_error":  # our own checks name what is wrong
            lines.append(f"  {key}: {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "invalid configuration:\n" + "\n".join(lines)


def build_config(values: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as error:
        raise PreftuneError(describe_errors(error)) from None


def load_config(profile: str = "quickstart", config_file: str | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Profile YAML, then a user's YAML file, then `--set key=value` overrides, each over the last."""
    values: dict[str, Any] = {"profile": profile}
    if config_file:
        values = _merge(values, _read_yaml(Path(config_file)))
    for dotted in overrides:
        values = _merge(values, _override(dotted))
    return build_config(values)
