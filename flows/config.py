"""PipelineConfig: every stage's settings in one typed object, built from a YAML profile.

The same object is the flow's parameter, so the Prefect UI renders it as a form and a deployment's
parameters are validated by the same rules as the CLI's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, StringConstraints, ValidationError, field_validator, model_validator

from tasks.base import PreftuneError, StrictModel, redacted_credential_message, redacted_settings
from tasks.methods import METHODS
from tasks.settings.data import DataSettings
from tasks.settings.evaluation import EvalSettings, MergeSettings
from tasks.settings.models import ModelSettings
from tasks.settings.plan import DistributedSettings, PlanSettings
from tasks.settings.tracking import TrackingSettings
from tasks.settings.training import ChatDataSettings, PolicySettings, RewardSettings, SFTSettings

AspectName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]*$")]

PROFILES_DIR = Path(__file__).resolve().parent.parent / "configs"


class PipelineConfig(StrictModel):
    """Settings given explicitly are applied over the named profile's YAML, so a deployment's
    parameters or a UI form only need what differs (e.g. `{profile: book, policy: {max_steps: 50}}`)."""

    profile: str = Field(
        "quickstart",
        description="The YAML profile in configs/ (quickstart, smoke, sample-data, "
        "book) the other settings are applied over.",
    )
    run_name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] | None = Field(
        None, description="The run's folder under runs_dir, a plain name (never a path); empty: the profile's name."
    )
    runs_dir: str = Field(
        "runs",
        description="Where runs are written; with PREFTUNE_RUNS_ROOT set (workers, deployments) it must lie inside it.",
    )
    data_root: str = Field(
        ".",
        description="The folder relative local data files (data.source, the aspects' and SFT's sources) are read from.",
    )
    data: DataSettings = Field(
        default_factory=DataSettings, description="The policy's preference pairs: source, filter and split."
    )
    model: ModelSettings = Field(
        default_factory=ModelSettings, description="The base model every stage starts from, and how it is loaded."
    )
    plan: PlanSettings = Field(
        default_factory=PlanSettings,
        description="How training is fitted to the device (auto) or run verbatim (recipe).",
    )
    distributed: DistributedSettings = Field(
        default_factory=DistributedSettings,
        description=(
            "Processes per training stage and how they share the model (accelerate: ddp, fsdp, deepspeed_zero2/3)."
        ),
    )
    parallel_stages: bool | None = Field(
        None,
        description=(
            "Train the independent stages (reward aspects, SFT) at once, each in its own process; empty: only when "
            "several GPUs are visible (off on a CPU, whose cores one stage fills)."
        ),
    )
    rewards: dict[AspectName, RewardSettings] = Field(
        default_factory=lambda: {"helpfulness": RewardSettings()},
        min_length=1,
        description=(
            "One reward model (judge) per aspect, by name; a profile's aspects are kept, given ones added or updated."
        ),
    )
    sft: SFTSettings = Field(
        default_factory=SFTSettings, description="Optional supervised fine-tuning before the preference method."
    )
    method: Literal[tuple(METHODS)] = Field(
        "dpo", description="The preference method (`preftune methods`: dpo, kto, orpo, simpo, rloo, grpo, ...)."
    )
    policy: PolicySettings = Field(
        default_factory=PolicySettings,
        description=("The method's trainer settings; other TRL options under TRL's own names."),
    )
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=("Settings for one method only, by method name, applied over policy when that method runs."),
    )
    merge: MergeSettings = Field(
        default_factory=MergeSettings, description="Merging the adapters into the base model, and its check."
    )
    evaluation: EvalSettings = Field(
        default_factory=EvalSettings, description="Held-out evaluation, the judges and the verdict."
    )
    tracking: TrackingSettings = Field(
        default_factory=TrackingSettings, description="The MLflow store, experiment, registered names and gate."
    )

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
    def _judges_need_their_own_questions(self) -> PipelineConfig:
        shared = [name for name, reward in self.rewards.items() if reward.data is None and reward.judge is None]
        if shared and not self.data.judge_fraction:
            raise ValueError(
                f"rewards {', '.join(shared)} train on the pipeline's data: set data.judge_fraction "
                "(e.g. 0.3) so they judge the policy on questions it never trained on, or give them "
                "their own data or a judge model"
            )
        return self

    @model_validator(mode="after")
    def _no_redacted_credentials(self) -> PipelineConfig:
        if found := redacted_settings(self.model_dump()):
            raise ValueError(redacted_credential_message(found))
        return self

    @model_validator(mode="after")
    def _judges_named_once(self) -> PipelineConfig:
        if both := sorted(set(self.evaluation.referees) & set(self.rewards)):
            raise ValueError(f"evaluation.referees {', '.join(both)}: already a reward aspect; name the referee apart")
        safety = self.evaluation.combination.safety_aspect
        if safety and safety not in set(self.rewards) | set(self.evaluation.referees):
            raise ValueError(
                f"evaluation.combination.safety_aspect {safety!r}: not a reward aspect or referee "
                f"(have {', '.join(sorted(set(self.rewards) | set(self.evaluation.referees)))})"
            )
        return self

    @model_validator(mode="after")
    def _methods_known(self) -> PipelineConfig:
        """Only the running method's entry is ever read, so a misspelt one would be ignored silently."""
        if unknown := sorted(set(self.methods) - set(METHODS)):
            raise ValueError(f"methods.{unknown[0]}: unknown method; choose one of {', '.join(METHODS)}")
        return self

    def policy_settings(self) -> PolicySettings:
        """`policy`, with the running method's own settings (`methods.<name>`) over it."""
        own = self.methods.get(self.method)
        return PolicySettings.model_validate(_merge(self.policy.model_dump(), own)) if own else self.policy

    def with_data_root(self) -> PipelineConfig:
        """The same settings with every relative local data file (any stage's `DataSettings` or
        `ChatDataSettings`, wherever it sits) resolved against `data_root`."""
        root = Path(self.data_root).expanduser()

        def resolve(value):
            if isinstance(value, (DataSettings, ChatDataSettings)):
                source = Path(value.source)
                return (
                    value
                    if not source.suffix or source.is_absolute()
                    else value.model_copy(update={"source": str(root / source)})
                )
            if isinstance(value, dict):
                return {key: resolve(item) for key, item in value.items()}
            if isinstance(value, BaseModel):
                changed = {
                    name: new
                    for name in type(value).model_fields
                    if (new := resolve(old := getattr(value, name))) is not old
                }
                return value.model_copy(update=changed) if changed else value
            return value

        return resolve(self)

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
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
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


def load_config(
    profile: str = "quickstart", config_file: str | None = None, overrides: list[str] = ()
) -> PipelineConfig:
    """Profile YAML, then a user's YAML file, then `--set key=value` overrides, each over the last."""
    values: dict[str, Any] = {"profile": profile}
    if config_file:
        values = _merge(values, _read_yaml(Path(config_file)))
    for dotted in overrides:
        values = _merge(values, _override(dotted))
    return build_config(values)
