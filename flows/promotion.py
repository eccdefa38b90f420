"""The promote-candidate flow: a registered candidate becomes `champion` on the gate's recorded verdict,
at once (`tracking.promotion.approval: auto`) or once a person approves it (`person`).

Waiting for a person: a run from a deployment suspends itself (`suspend_flow_run`), so its process
ends and no worker, GPU or memory is held; the Prefect UI shows it Suspended with a form (approve,
approved by, reason), and resuming it starts the flow again, which picks the answer up where it
suspended. A run outside a deployment has no worker to start it again, so it pauses in its process
(`pause_flow_run`) instead. Every outcome (promoted, not promoted, waiting for approval, rejected,
refused) is kept on the version and told to `tracking.promotion.notify_block`.
"""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field

from tasks.base import PreftuneError, redact
from tasks.promotion import PromotionOutcome, describe, mark, now, recorded_decision
from tasks.tracking import PromotionSettings, RegisteredVersion, TrackingSettings, configure, decide_outcome
from tasks.verdict import PromotionDecision

APPROVAL_KEY = "approval"


class ApprovalInput(RunInput):
    """What a person answers in the Prefect UI to let a candidate become champion (or not)."""

    approve: bool = Field(description="Promote this candidate to champion.")
    approved_by: str = Field(min_length=1, description="Who decides (your name).")
    reason: str = Field(min_length=1, description="Why: kept on the model version with the verdict.")


def notify(outcome: PromotionOutcome, settings: PromotionSettings) -> None:
    """Log the outcome, and tell the notification block when one is named (a failure to tell is logged,
    never undoes the promotion)."""
    logger = get_run_logger()
    logger.info("%s: %s", outcome.subject(), outcome.message)
    if not settings.notify_block:
        return
    from prefect.blocks.core import Block
    from prefect.blocks.abstract import NotificationBlock

    block = Block.load(settings.notify_block)
    if not isinstance(block, NotificationBlock):
        raise PreftuneError(f"tracking.promotion.notify_block {settings.notify_block!r} is a {type(block).__name__}, "
                            "not a notification block")
    lines = [outcome.message]
    lines += [f"{label}: {value}" for label, value in (("decided by", outcome.approved_by), ("reason", outcome.reason),
                                                        ("decided at", outcome.decided_at),
                                                        ("flow run", flow_run.get_id()))
              if value]
    try:
        block.notify(body=redact("\n".join(lines)), subject=outcome.subject())
    except Exception as error:  # the registry holds the truth; a webhook that is down must not fail a promotion
        logger.warning("could not notify %s: %s", settings.notify_block, redact(str(error)))


def already_answered() -> bool:
    """Whether this run is the re-run of a suspended one that a person has answered."""
    from prefect.input.actions import read_flow_run_input
    from prefect.input.run_input import keyset_from_base_key

    return read_flow_run_input(keyset_from_base_key(f"suspended-{APPROVAL_KEY}")["response"]) is not None


def wait_for_approval(decision: PromotionDecision, waiting: PromotionOutcome,
                      settings: PromotionSettings) -> ApprovalInput:
    """Suspend (from a deployment: nothing is held) or pause (in this process) until a person answers."""
    from prefect.flow_runs import pause_flow_run, suspend_flow_run

    form = ApprovalInput.with_initial_data(
        description=f"### Promote {waiting.model} v{waiting.version} to @{settings.alias}?\n\n{describe(decision)}",
        approve=False)
    timeout = int(settings.approval_timeout_hours * 3600)
    if FlowRunContext.get().flow_run.deployment_id:
        if not already_answered():
            notify(waiting, settings)
        return suspend_flow_run(wait_for_input=form, timeout=timeout, key=APPROVAL_KEY)
    notify(waiting, settings)
    return pause_flow_run(wait_for_input=form, timeout=timeout, key=APPROVAL_KEY,
                          poll_interval=settings.approval_poll_seconds)


@flow(name="promote-candidate", flow_run_name="{model_name}-v{version}")
def promote_candidate(model_name: str, version: str, tracking: TrackingSettings = TrackingSettings(),
                      approved_by: str | None = None, reason: str | None = None) -> PromotionOutcome:
    """Promote one registered version on its recorded verdict; with `approval: person` and no
    `approved_by` given, wait for a person's answer first."""
    configure(tracking)
    settings = tracking.promotion
    decision = recorded_decision(model_name, version)
    if decision.promoted and settings.approval == "person" and approved_by is None:
        waiting = decide_outcome(model_name, version, decision, settings)
        answer = wait_for_approval(decision, waiting, settings)
        approved_by, reason = answer.approved_by, answer.reason
        if not answer.approve:
            outcome = mark(model_name, version, PromotionOutcome(
                status="rejected", model=model_name, version=version, verdict=decision.verdict,
                message=f"{approved_by} did not approve it: {reason}", approved_by=approved_by, reason=reason,
                decided_at=now()))
            notify(outcome, settings)
            return outcome
    outcome = decide_outcome(model_name, version, decision, settings, approved_by, reason)
    notify(outcome, settings)
    return outcome


def start_promotion(policy: RegisteredVersion, decision: PromotionDecision, tracking: TrackingSettings) -> PromotionOutcome:
    """The training flow's last step. Without a person to wait for, the promotion runs here, as a
    subflow. With one, it becomes a run of the promotion deployment, which waits suspended, and this
    run ends: a GPU worker is not held for hours. Without that deployment on the server (a local
    `preftune run` on Prefect's temporary server, which nobody can open to approve), the candidate
    stays candidate and the log says how to promote it."""
    settings = tracking.promotion
    if settings.approval == "auto" or not decision.promoted:
        return promote_candidate(policy.name, policy.version, tracking)
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    waiting = decide_outcome(policy.name, policy.version, decision, settings)
    try:
        run = run_deployment(settings.deployment, timeout=0, idempotency_key=f"{flow_run.get_id()}-{policy.version}",
                             flow_run_name=f"{policy.name}-v{policy.version}",
                             parameters={"model_name": policy.name, "version": policy.version,
                                         "tracking": tracking.model_dump(mode="json")})
    except ObjectNotFound:
        outcome = mark(policy.name, policy.version, waiting.model_copy(update={"message": (
            f"{waiting.message}: run `preftune promote {policy.version} --model {policy.name} --approved-by NAME --reason "
            f"TEXT`, "
            f"or register the {settings.deployment} deployment (`preftune deploy`) so promotions wait in the Prefect UI")}))
        notify(outcome, settings)
        return outcome
    return mark(policy.name, policy.version, waiting.model_copy(update={"message": (
        f"{waiting.message}: flow run {run.name} ({run.id}) of {settings.deployment} waits for the approval")}))
