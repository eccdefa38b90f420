"""Where runs are recorded, the registered names, and the promotion gate: settings only, no MLflow."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import MayHoldCredentials, StrictModel


class PromotionSettings(StrictModel):
    """The gate (tasks/verdict.py): the new policy becomes `champion` only if the 95 % interval of its
    length-controlled combined improvement over the current champion (first run: its reference), prompt
    by prompt on held-out prompts and by the judges that earned a say, lies entirely above this margin,
    and no heard judge nor the ground truth rates it worse. A lucky prompt or two cannot promote a model."""

    alias: str = Field("champion", description="The registry alias the gate moves.")
    min_improvement: float = Field(
        0.0,
        ge=0,
        description="The margin the improvement's lower bound must clear, in "
        "spreads of the judges' scores (never below 0: a worse "
        "model cannot pass).",
    )
    drift_tolerance: float = Field(
        0.05,
        ge=0,
        le=1,
        description="How far an unasked format's or degenerate "
        "repetition's rate on control prompts may rise (a "
        "share: 0.05 is 5 points) before a significant rise "
        "blocks promotion.",
    )
    approval: Literal["auto", "person"] = Field(
        "auto",
        description="auto: a candidate that passes the gate becomes champion at once; person: it stays "
        "candidate until a person approves it (the promote-candidate flow waits for their "
        "input in the Prefect UI, or `preftune promote`).",
    )
    approval_timeout_hours: float = Field(
        168.0, gt=0, description="How long a promotion waits for a person's approval before its run fails."
    )
    approval_poll_seconds: int = Field(
        5,
        ge=1,
        description="How often a promotion waiting in its own process (not "
        "from a deployment) asks the server for the answer.",
    )
    deployment: str = Field(
        "promote-candidate/promote",
        description="The promotion flow's deployment (flow/name) "
        "a run starts when a person must approve; "
        "without it on the server, the run logs how to "
        "promote by hand.",
    )
    notify_block: str | None = Field(
        None,
        description="A Prefect notification block (`<block-type>/<name>`, e.g. "
        "custom-webhook/preftune) told every verdict: promoted, not "
        "promoted, waiting for approval, rejected or refused.",
    )


class TrackingSettings(StrictModel):
    """Where runs are recorded and under which names models are registered."""

    tracking_uri: MayHoldCredentials | None = Field(
        None, description="The MLflow tracking store; empty: $MLFLOW_TRACKING_URI, else SQLite under ./mlflow."
    )
    experiment: str = Field("preftune", description="The MLflow experiment the runs go to.")
    policy_model_name: str = Field(
        "preftune-policy", description="The registered model the tuned policy is a version of."
    )
    reward_model_prefix: str = Field(
        "preftune-reward", description="Reward models are registered as `<prefix>-<aspect>`, one per aspect."
    )
    alias: str = Field("candidate", description="The registry alias every newly registered version gets.")
    register_models: bool = Field(
        True,
        description="Register the policy and reward models at the end of a run "
        "(off: evaluate only, the registry is untouched).",
    )
    promotion: PromotionSettings = Field(
        default_factory=PromotionSettings, description="The gate that moves the champion alias."
    )
    license: str | None = Field(
        None,
        description="The licence on the registered models' cards (a Hugging Face "
        "licence id such as apache-2.0); empty: the base model's, as "
        "its own card declares it.",
    )
