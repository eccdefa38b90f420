"""Promotion, in one place: from the gate's decision (tasks/verdict.py decides) to the `champion` alias.

- Deciding: `decide_promotion` weighs the evaluation's evidence against `tracking.promotion`'s margins;
  `current_champion` is the champion a candidate is judged against (the evaluation's baseline).
- Recording: `log_decision` keeps the verdict on the candidate's version (tags, its description, the
  decision itself as JSON on the run that registered it), from where a later promotion, a person's
  hours on, reads exactly what was decided (`recorded_decision`).
- Acting: `decide_outcome` promotes a version that passed (`promote`), says it waits for a person, or
  says why nothing moved; every outcome is kept on the version (`mark`).
- A person's approval: the form (`ApprovalInput`), waiting for it (`wait_for_approval`), and telling
  every outcome to `tracking.promotion.notify_block` (`notify`).
The Prefect flows that run these steps are in flows/promotion.py; the registry code (tasks/tracking.py)
only registers versions.

The `champion` alias moves once per promotion, under a lock, and only if the champion the candidate was
judged against is still the champion. MLflow has no compare-and-set on aliases, so two runs that each
read the champion and then move it could both "win". The re-check and the move therefore happen inside
one slot of a Prefect global concurrency limit of size 1 per registered model
(`preftune-promotion-<model>`), which every process talking to the same Prefect server shares; the slot
is a lease the server takes back if its holder dies. Whoever comes second finds the champion moved and
is refused, with the reason.
"""

from __future__ import annotations

import contextlib
import re
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from prefect import get_run_logger
from prefect.input import RunInput
from pydantic import BaseModel, Field

from tasks.base import PreftuneError, redact
from tasks.settings.tracking import PromotionSettings, TrackingSettings
from tasks.tracking import RegisteredVersion, model_key
from tasks.verdict import GateInput, PromotionDecision, decide

Status = Literal["promoted", "not promoted", "waiting for approval", "rejected", "refused"]
DECISION_ARTIFACT = "promotion/decision.json"
LOCK_TIMEOUT_S = 300.0
APPROVAL_KEY = "approval"


class PromotionRefused(PreftuneError):
    """The champion moved after the candidate was judged: it must be judged again, not promoted."""


class PromotionOutcome(BaseModel):
    """What became of one candidate: told to people (notifications) and kept on the version (tags)."""

    status: Status
    model: str
    version: str
    verdict: str
    message: str
    approved_by: str | None = None
    reason: str | None = None
    decided_at: str | None = None
    previous_champion: str | None = None

    def subject(self) -> str:
        return f"preftune: {self.model} v{self.version} {self.status} (verdict: {self.verdict})"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def lock_name(model: str) -> str:
    """The global concurrency limit that serialises promotions of one registered model."""
    return "preftune-promotion-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model)


def ensure_lock(name: str) -> None:
    """A limit of exactly one active slot: missing, Prefect would let `concurrency()` through unlimited
    (or fail it, under `strict`), and a limit someone raised would no longer exclude anyone."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another promotion created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1, active=True))
            return
        if limit.limit != 1 or not limit.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))


@contextmanager
def promotion_lock(model: str, timeout_s: float = LOCK_TIMEOUT_S):
    """Hold the model's promotion slot (server-wide) for the re-check and the move."""
    from prefect.concurrency.sync import concurrency

    name = lock_name(model)
    ensure_lock(name)
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
            yield
    except TimeoutError:
        raise PromotionRefused(
            f"another promotion of {model} has held its lock ({name}) for over {timeout_s:g} s; "
            "try again when it has finished"
        ) from None


def expected_champion(decision: PromotionDecision, model: str) -> str | None:
    """The champion version the candidate was judged against (None: its reference, no champion then)."""
    baseline = decision.gate.baseline
    prefix = f"models:/{model}/"
    return baseline.removeprefix(prefix) if baseline.startswith(prefix) else None


def champion_version(model: str, alias: str) -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(model, alias).version)
    except MlflowException:
        return None


def current_champion(settings: TrackingSettings, candidate_dir: str | None = None) -> str | None:
    """The champion's pinned URI (`models:/name/version`), or None before the first promotion, and
    None when the champion is the candidate itself (an unchanged re-run compares against the reference
    again, so its cached evaluation is found instead of a model judged against itself)."""
    try:
        version = MlflowClient().get_model_version_by_alias(settings.policy_model_name, settings.promotion.alias)
    except MlflowException:
        return None
    if candidate_dir and version.tags.get("preftune.model_key") == model_key(candidate_dir):
        return None
    return f"models:/{settings.policy_model_name}/{version.version}"


def decide_promotion(gate: GateInput, settings: PromotionSettings) -> PromotionDecision:
    """The evaluation's evidence against this gate's margins (tasks/verdict.py decides)."""
    return decide(gate, settings.min_improvement, settings.drift_tolerance)


def describe(decision: PromotionDecision, approval: str | None = None) -> str:
    """The version's description, in plain words: who approved it, the gate's statement (the verdict, its
    evidence with intervals, what was required), and the judges heard and not."""
    gate = decision.gate
    lines = [approval] if approval else []
    lines.append(decision.statement())
    for heard, label in ((True, "Judges heard"), (False, "Not heard")):
        judges = [f"{j.aspect} ({j.reason})" for j in gate.judges if j.heard is heard]
        if judges:
            lines.append(f"{label}: " + "; ".join(judges) + ".")
    return "\n\n".join(lines)


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def log_decision(policy: RegisteredVersion, decision: PromotionDecision) -> None:
    """`record_decision` for a version just registered, on the run that registered it (the register stage's)."""
    record_decision(policy.name, policy.version, decision, policy.register_run_id or None)


def record_decision(model: str, version: str, decision: PromotionDecision, run_id: str | None = None) -> None:
    """The gate's verdict on the version (tags, description) and on `run_id` (default: the active run, if
    any): the same tags, the figures as metrics (`promotion.promoted` says the gate passed it;
    `promotion.outcome` on the version, what became of it), and the decision itself as JSON, from where a
    later promotion (a person's, hours on) reads exactly what was decided."""
    client = MlflowClient()
    record = decision.record()
    for key, value in record.items():
        client.set_model_version_tag(model, version, key, value)
    if run_id := run_id or active_run_id():
        gate = decision.gate
        metrics = (
            {
                "promotion.promoted": float(decision.promoted),
                "promotion.judges_heard": float(sum(judge.heard for judge in gate.judges)),
            }
            | (gate.lc_improvement.metrics("promotion.lc_improvement") if gate.lc_improvement else {})
            | (gate.improvement.metrics("promotion.improvement") if gate.improvement else {})
        )
        timestamp = int(time.time() * 1000)
        client.log_batch(
            run_id,
            tags=[RunTag(key, value) for key, value in record.items()],
            metrics=[Metric(key, value, timestamp, 0) for key, value in metrics.items()],
        )
        client.log_dict(run_id, decision.model_dump(mode="json"), DECISION_ARTIFACT)
        client.set_model_version_tag(model, version, "promotion.decision", f"runs:/{run_id}/{DECISION_ARTIFACT}")
    tags = client.get_model_version(model, version).tags
    kept = (
        approval_line(
            tags["promotion.approved_by"], tags["promotion.decided_at"], tags.get("promotion.approval_reason", "")
        )
        if tags.get("promotion.outcome") == "promoted"
        else None
    )  # an unchanged re-run of the champion keeps who approved it
    client.update_model_version(model, version, description=describe(decision, kept))


def approval_line(approved_by: str, decided_at: str, reason: str) -> str:
    return f"Champion since {decided_at}, approved by {approved_by}: {reason}"


def recorded_decision(model: str, version: str) -> PromotionDecision:
    """The decision the training run recorded on this version."""
    tags = MlflowClient().get_model_version(model, version).tags
    if "promotion.decision" not in tags:
        raise PreftuneError(
            f"{model} v{version} has no recorded verdict (tag promotion.decision): only a version the "
            "training flow registered and judged can be promoted"
        )
    return PromotionDecision.model_validate(mlflow.artifacts.load_dict(tags["promotion.decision"]))


def decide_outcome(
    model: str,
    version: str,
    decision: PromotionDecision,
    settings: PromotionSettings,
    approved_by: str | None = None,
    reason: str | None = None,
) -> PromotionOutcome:
    """Promote a version that passed when no person needs to approve, or when one did (`approved_by`);
    otherwise say why nothing moved. Every outcome is kept on the version."""
    if champion_version(model, settings.alias) == version:  # an unchanged re-run of the champion: nothing to decide
        return PromotionOutcome(
            status="promoted",
            model=model,
            version=version,
            verdict=decision.verdict,
            message=f"{model} v{version} already is @{settings.alias}",
        )
    outcome = PromotionOutcome(
        status="not promoted",
        model=model,
        version=version,
        verdict=decision.verdict,
        message=f"the gate did not pass it: {decision.reason}",
    )
    if decision.promoted and settings.approval == "person" and approved_by is None:
        outcome = outcome.model_copy(
            update={
                "status": "waiting for approval",
                "message": (f"the gate passed it ({decision.reason}); it stays @candidate until a person approves"),
            }
        )
    elif decision.promoted:
        try:
            return promote(
                model,
                version,
                decision,
                settings.alias,
                approved_by or "the gate (approval: auto)",
                reason or decision.reason,
            )
        except PromotionRefused as refused:
            outcome = outcome.model_copy(
                update={"status": "refused", "message": str(refused), "approved_by": approved_by, "reason": reason}
            )
    return mark(model, version, outcome)


def promote(
    model: str, version: str, decision: PromotionDecision, alias: str, approved_by: str, reason: str
) -> PromotionOutcome:
    """Move `alias` to the candidate if the gate passed and the champion it was judged against is still
    the champion; mark the previous champion superseded. Idempotent: a candidate that already is the
    champion is reported promoted again and nothing moves. Raises PromotionRefused otherwise."""
    if not decision.promoted:
        raise PromotionRefused(
            f"{model} v{version} did not pass the gate (verdict: {decision.verdict}); no approval can promote it"
        )
    client = MlflowClient()
    expected = expected_champion(decision, model)
    with promotion_lock(model):
        current = champion_version(model, alias)
        if current == version:
            return PromotionOutcome(
                status="promoted",
                model=model,
                version=version,
                verdict=decision.verdict,
                message=f"{model} v{version} already is @{alias}",
                approved_by=approved_by,
                reason=reason,
            )
        if current != expected:
            judged = f"v{expected}" if expected else "its reference (there was no champion)"
            raise PromotionRefused(
                f"{model} v{version} was judged against {judged}, but @{alias} is now v{current}: "
                "another run promoted meanwhile; evaluate this candidate against the new champion"
            )
        decided_at = now()
        client.set_registered_model_alias(model, alias, version)
    approval = approval_line(approved_by, decided_at, reason)
    for key, value in {
        "promotion.approved_by": approved_by,
        "promotion.decided_at": decided_at,
        "promotion.approval_reason": reason[:5000],
        "promotion.previous_champion": current or "none",
        "promotion.outcome": "promoted",
    }.items():
        client.set_model_version_tag(model, version, key, value)
    client.update_model_version(model, version, description=describe(decision, approval))
    if current:
        client.set_model_version_tag(model, current, "superseded_by", version)
        client.set_model_version_tag(model, current, "superseded_at", decided_at)
    return PromotionOutcome(
        status="promoted",
        model=model,
        version=version,
        verdict=decision.verdict,
        message=f"{model} v{version} is now @{alias}" + (f", superseding v{current}" if current else ""),
        approved_by=approved_by,
        reason=reason,
        decided_at=decided_at,
        previous_champion=current,
    )


def mark(model: str, version: str, outcome: PromotionOutcome) -> PromotionOutcome:
    """Keep an outcome that moved nothing (rejected, refused, waiting) on the version."""
    client = MlflowClient()
    tags = {"promotion.outcome": outcome.status, "promotion.outcome_message": outcome.message[:5000]}
    if outcome.approved_by:
        tags |= {
            "promotion.decided_by": outcome.approved_by,
            "promotion.decided_at": outcome.decided_at or now(),
            "promotion.approval_reason": (outcome.reason or "")[:5000],
        }
    for key, value in tags.items():
        client.set_model_version_tag(model, version, key, value)
    return outcome


class ApprovalInput(RunInput):
    """What a person answers in the Prefect UI to let a candidate become champion (or not)."""

    approve: bool = Field(description="Promote this candidate to champion.")
    approved_by: str = Field(min_length=1, description="Who decides (your name).")
    reason: str = Field(min_length=1, description="Why: kept on the model version with the verdict.")


def notify(outcome: PromotionOutcome, settings: PromotionSettings) -> None:
    """Log the outcome, and tell the notification block when one is named (a failure to tell is logged,
    never undoes the promotion)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    logger.info("%s: %s", outcome.subject(), outcome.message)
    if not settings.notify_block:
        return
    from prefect.blocks.abstract import NotificationBlock
    from prefect.blocks.core import Block

    block = Block.load(settings.notify_block)
    if not isinstance(block, NotificationBlock):
        raise PreftuneError(
            f"tracking.promotion.notify_block {settings.notify_block!r} is a {type(block).__name__}, "
            "not a notification block"
        )
    lines = [outcome.message]
    lines += [
        f"{label}: {value}"
        for label, value in (
            ("decided by", outcome.approved_by),
            ("reason", outcome.reason),
            ("decided at", outcome.decided_at),
            ("flow run", flow_run.get_id()),
        )
        if value
    ]
    try:
        block.notify(body=redact("\n".join(lines)), subject=outcome.subject())
    except Exception as error:  # the registry holds the truth; a webhook that is down must not fail a promotion
        logger.warning("could not notify %s: %s", settings.notify_block, redact(str(error)))


def already_answered() -> bool:
    """Whether this run is the re-run of a suspended one that a person has answered."""
    from prefect.input.actions import read_flow_run_input
    from prefect.input.run_input import keyset_from_base_key

    return read_flow_run_input(keyset_from_base_key(f"suspended-{APPROVAL_KEY}")["response"]) is not None


def wait_for_approval(
    decision: PromotionDecision, waiting: PromotionOutcome, settings: PromotionSettings
) -> ApprovalInput:
    """Suspend (a run from a deployment: nothing is held) or pause (in this process) until a person answers."""
    from prefect.context import FlowRunContext
    from prefect.flow_runs import pause_flow_run, suspend_flow_run

    form = ApprovalInput.with_initial_data(
        description=f"### Promote {waiting.model} v{waiting.version} to @{settings.alias}?\n\n{describe(decision)}",
        approve=False,
    )
    timeout = int(settings.approval_timeout_hours * 3600)
    if FlowRunContext.get().flow_run.deployment_id:
        if not already_answered():
            notify(waiting, settings)
        return suspend_flow_run(wait_for_input=form, timeout=timeout, key=APPROVAL_KEY)
    notify(waiting, settings)
    return pause_flow_run(
        wait_for_input=form, timeout=timeout, key=APPROVAL_KEY, poll_interval=settings.approval_poll_seconds
    )
