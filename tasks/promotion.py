"""Moving the `champion` alias: once per promotion, under a lock, and only if the champion the candidate
was judged against is still the champion.

MLflow has no compare-and-set on aliases, so two runs that each read the champion and then move it
could both "win". The re-check and the move therefore happen inside one slot of a Prefect global
concurrency limit of size 1 per registered model (`preftune-promotion-<model>`), which every process
talking to the same Prefect server shares; the slot is a lease the server takes back if its holder
dies. Whoever comes second finds the champion moved and is refused, with the reason.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Literal

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from tasks.base import PreftuneError
from tasks.verdict import PromotionDecision

Status = Literal["promoted", "not promoted", "waiting for approval", "rejected", "refused"]
DECISION_ARTIFACT = "promotion/decision.json"
LOCK_TIMEOUT_S = 300.0


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
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1, active=True))
            except ObjectAlreadyExists:  # another promotion created it first
                pass
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
        raise PromotionRefused(f"another promotion of {model} has held its lock ({name}) for over {timeout_s:g} s; "
                               "try again when it has finished") from None


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


def describe(decision: PromotionDecision, approval: str | None = None) -> str:
    """The version's description, in plain words: the verdict, its intervals, the judges heard and not."""
    gate = decision.gate
    lines = [approval] if approval else []
    lines.append(f"Verdict: {decision.verdict}. {decision.reason}.")
    if gate.lc_improvement is not None:
        lines.append(f"Against {gate.baseline} on {gate.prompts} held-out prompts ({gate.rule} rule): length-controlled "
                     f"improvement {gate.lc_improvement.text()}, raw {gate.improvement.text()}; required: lower bound "
                     f"above {decision.min_improvement:g}.")
    if gate.ground_truth is not None:
        lines.append(f"Ground truth (rule checker): pass-rate difference {gate.ground_truth.text()}.")
    for heard, label in ((True, "Judges heard"), (False, "Not heard")):
        judges = [f"{j.aspect} ({j.reason})" for j in gate.judges if j.heard is heard]
        if judges:
            lines.append(f"{label}: " + "; ".join(judges) + ".")
    return "\n\n".join(lines)


def record_decision(model: str, version: str, decision: PromotionDecision) -> None:
    """The gate's verdict on the version (tags, description) and, as JSON, on the active run, from
    where a later promotion (a person's, hours on) reads exactly what was decided."""
    client = MlflowClient()
    for key, value in decision.record().items():
        client.set_model_version_tag(model, version, key, value)
    run = mlflow.active_run()
    if run is not None:
        mlflow.log_dict(decision.model_dump(mode="json"), DECISION_ARTIFACT)
        client.set_model_version_tag(model, version, "promotion.decision", f"runs:/{run.info.run_id}/{DECISION_ARTIFACT}")
    tags = client.get_model_version(model, version).tags
    kept = approval_line(tags["promotion.approved_by"], tags["promotion.decided_at"], tags.get("promotion.approval_reason", "")) \
        if tags.get("promotion.outcome") == "promoted" else None  # an unchanged re-run of the champion keeps who approved it
    client.update_model_version(model, version, description=describe(decision, kept))


def approval_line(approved_by: str, decided_at: str, reason: str) -> str:
    return f"Champion since {decided_at}, approved by {approved_by}: {reason}"


def recorded_decision(model: str, version: str) -> PromotionDecision:
    """The decision the training run recorded on this version."""
    tags = MlflowClient().get_model_version(model, version).tags
    if "promotion.decision" not in tags:
        raise PreftuneError(f"{model} v{version} has no recorded verdict (tag promotion.decision): only a version the "
                            "training flow registered and judged can be promoted")
    return PromotionDecision.model_validate(mlflow.artifacts.load_dict(tags["promotion.decision"]))


def promote(model: str, version: str, decision: PromotionDecision, alias: str, approved_by: str,
            reason: str) -> PromotionOutcome:
    """Move `alias` to the candidate if the gate passed and the champion it was judged against is still
    the champion; mark the previous champion superseded. Idempotent: a candidate that already is the
    champion is reported promoted again and nothing moves. Raises PromotionRefused otherwise."""
    if not decision.promoted:
        raise PromotionRefused(f"{model} v{version} did not pass the gate (verdict: {decision.verdict}); no approval "
                               "can promote it")
    client = MlflowClient()
    expected = expected_champion(decision, model)
    with promotion_lock(model):
        current = champion_version(model, alias)
        if current == version:
            return PromotionOutcome(status="promoted", model=model, version=version, verdict=decision.verdict,
                                    message=f"{model} v{version} already is @{alias}", approved_by=approved_by,
                                    reason=reason)
        if current != expected:
            judged = f"v{expected}" if expected else "its reference (there was no champion)"
            raise PromotionRefused(f"{model} v{version} was judged against {judged}, but @{alias} is now v{current}: "
                                   "another run promoted meanwhile; evaluate this candidate against the new champion")
        decided_at = now()
        client.set_registered_model_alias(model, alias, version)
    approval = approval_line(approved_by, decided_at, reason)
    for key, value in {"promotion.approved_by": approved_by, "promotion.decided_at": decided_at,
                       "promotion.approval_reason": reason[:5000], "promotion.previous_champion": current or "none",
                       "promotion.outcome": "promoted"}.items():
        client.set_model_version_tag(model, version, key, value)
    client.update_model_version(model, version, description=describe(decision, approval))
    if current:
        client.set_model_version_tag(model, current, "superseded_by", version)
        client.set_model_version_tag(model, current, "superseded_at", decided_at)
    return PromotionOutcome(status="promoted", model=model, version=version, verdict=decision.verdict,
                            message=f"{model} v{version} is now @{alias}" + (f", superseding v{current}" if current else ""),
                            approved_by=approved_by, reason=reason, decided_at=decided_at, previous_champion=current)


def mark(model: str, version: str, outcome: PromotionOutcome) -> PromotionOutcome:
    """Keep an outcome that moved nothing (rejected, refused, waiting) on the version."""
    client = MlflowClient()
    tags = {"promotion.outcome": outcome.status, "promotion.outcome_message": outcome.message[:5000]}
    if outcome.approved_by:
        tags |= {"promotion.decided_by": outcome.approved_by, "promotion.decided_at": outcome.decided_at or now(),
                 "promotion.approval_reason": (outcome.reason or "")[:5000]}
    for key, value in tags.items():
        client.set_model_version_tag(model, version, key, value)
    return outcome
