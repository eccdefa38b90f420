"""The promote-candidate flow: a registered candidate becomes `champion` on the gate's recorded verdict,
at once (`tracking.promotion.approval: auto`) or once a person approves it (`person`).

Waiting for a person: a run from a deployment suspends itself (`suspend_flow_run`), so its process
ends and no worker, GPU or memory is held; the Prefect UI shows it Suspended with a form (approve,
approved by, reason), and resuming it starts the flow again, which picks the answer up where it
suspended. A run outside a deployment has no worker to start it again, so it pauses in its process
(`pause_flow_run`) instead. Every outcome (promoted, not promoted, waiting for approval, rejected,
refused) is kept on the version and told to `tracking.promotion.notify_block`.

Only the flows are here; what they do (deciding, recording, the lock, the alias, the approval form) is
tasks/promotion.py.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from tasks.promotion import (
    PromotionOutcome,
    decide_outcome,
    log_decision,
    mark,
    notify,
    now,
    recorded_decision,
    wait_for_approval,
)
from tasks.settings.tracking import TrackingSettings
from tasks.tracking import RegisteredVersion, configure
from tasks.verdict import PromotionDecision


@flow(name="promote-candidate", flow_run_name="{model_name}-v{version}")
def promote_candidate(
    model_name: str,
    version: str,
    tracking: TrackingSettings = TrackingSettings(),
    approved_by: str | None = None,
    reason: str | None = None,
) -> PromotionOutcome:
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
            outcome = mark(
                model_name,
                version,
                PromotionOutcome(
                    status="rejected",
                    model=model_name,
                    version=version,
                    verdict=decision.verdict,
                    message=f"{approved_by} did not approve it: {reason}",
                    approved_by=approved_by,
                    reason=reason,
                    decided_at=now(),
                ),
            )
            notify(outcome, settings)
            return outcome
    outcome = decide_outcome(model_name, version, decision, settings, approved_by, reason)
    notify(outcome, settings)
    return outcome


def start_promotion(
    policy: RegisteredVersion, decision: PromotionDecision, tracking: TrackingSettings
) -> PromotionOutcome:
    """The training flow's last step, once the policy is registered: record the gate's decision on its
    version (and on the run that registered it), then promote. Without a person to wait for, the
    promotion runs here, as a subflow. With one, it becomes a run of the promotion deployment, which
    waits suspended, and this run ends: a GPU worker is not held for hours. Without that deployment on
    the server (a local `preftune run` on Prefect's temporary server, which nobody can open to approve),
    the candidate stays candidate and the log says how to promote it."""
    log_decision(policy, decision)
    settings = tracking.promotion
    if settings.approval == "auto" or not decision.promoted:
        return promote_candidate(policy.name, policy.version, tracking)
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    waiting = decide_outcome(policy.name, policy.version, decision, settings)
    try:
        run = run_deployment(
            settings.deployment,
            timeout=0,
            idempotency_key=f"{flow_run.get_id()}-{policy.version}",
            flow_run_name=f"{policy.name}-v{policy.version}",
            parameters={
                "model_name": policy.name,
                "version": policy.version,
                "tracking": tracking.model_dump(mode="json"),
            },
        )
    except ObjectNotFound:
        outcome = mark(
            policy.name,
            policy.version,
            waiting.model_copy(
                update={
                    "message": (
                        f"{waiting.message}: run `preftune promote {policy.version} --model {policy.name} "
                        f"--approved-by NAME --reason TEXT`, or register the {settings.deployment} deployment "
                        "(`preftune deploy`) so promotions wait in the Prefect UI"
                    )
                }
            ),
        )
        notify(outcome, settings)
        return outcome
    return mark(
        policy.name,
        policy.version,
        waiting.model_copy(
            update={
                "message": (
                    f"{waiting.message}: flow run {run.name} ({run.id}) of {settings.deployment} waits for the approval"
                )
            }
        ),
    )
