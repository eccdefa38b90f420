"""Promotion to champion as its own step: a person's approval through a paused Prefect run, the lock that
lets only one of two concurrent promotions win, the record on the version, and a notification of every
outcome to a real local webhook receiver. Real MLflow registry (SQLite), real Prefect test server."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import flow, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateName,
)
from prefect.flow_runs import resume_flow_run

from flows.promotion import promote_candidate, start_promotion
from tasks.promotion import PromotionRefused, decide_promotion, lock_name, log_decision, promote, promotion_lock
from tasks.settings.tracking import PromotionSettings, TrackingSettings
from tasks.stats import Estimate
from tasks.tracking import RegisteredVersion, configure, register_model, registry_card, save_mlflow_model
from tasks.verdict import GateInput, standing

HEARD = standing("helpfulness", 1.0, Estimate(value=0.86, ci_low=0.79, ci_high=0.94, n=65), 0.1, 0.5)
TAGS = {
    "data.sha256": "d" * 64,
    "data.source": "synthetic:instructions",
    "git.commit": "abc123",
    "method": "dpo",
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def gate(low: float, value: float, high: float, baseline: str = "reference") -> GateInput:
    interval = Estimate(value=value, ci_low=low, ci_high=high, n=32)
    return GateInput(
        baseline=baseline,
        judges=[HEARD],
        candidate_score=value,
        baseline_score=0.0,
        improvement=interval,
        lc_improvement=interval,
        prompts=32,
        judge_lc_improvement={HEARD.aspect: interval},
    )


@pytest.fixture(scope="module")
def mlflow_model(tiny_model_path, tmp_path_factory) -> Path:
    """One real MLflow transformers model of the tiny model; each candidate is a copy in its own folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path_factory.mktemp("promotion") / "model"
    save_mlflow_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        AutoTokenizer.from_pretrained(tiny_model_path),
        "text-generation",
        target,
    )
    return target


@pytest.fixture()
def settings(tracking_uri) -> TrackingSettings:
    settings = TrackingSettings(policy_model_name="promo-policy", license="apache-2.0")
    configure(settings)
    return settings


@pytest.fixture()
def register(settings, mlflow_model, tmp_path):
    """Register a candidate as the flow's register stage does: in a run of its own, with its card, and
    no verdict recorded yet."""

    def register(number: int, decision) -> RegisteredVersion:
        folder = tmp_path / f"candidate-{number}"
        shutil.copytree(mlflow_model, folder)
        model_dir = str(folder / "model")
        with mlflow.start_run(run_name=f"register-{number}"):
            return register_model(
                model_dir,
                settings.policy_model_name,
                settings,
                TAGS,
                registry_card(settings.policy_model_name, model_dir, settings, TAGS, decision),
            )

    return register


@pytest.fixture()
def registry(settings, register):
    """Registered candidates with the gate's decision recorded, as the training flow leaves them; returns
    the version."""

    def candidate(number: int, decision) -> str:
        version = register(number, decision)
        log_decision(version, decision)
        return version.version

    return settings, candidate


def passed(baseline: str = "reference"):
    return decide_promotion(gate(0.1, 0.3, 0.5, baseline), PromotionSettings())


def champion(settings: TrackingSettings) -> str:
    return str(MlflowClient().get_model_version_by_alias(settings.policy_model_name, "champion").version)


def person(settings: TrackingSettings, **promotion) -> TrackingSettings:
    """Approval by a person, the paused run asking for the answer every second (not every 5)."""
    return settings.model_copy(
        update={"promotion": PromotionSettings(approval="person", approval_poll_seconds=1, **promotion)}
    )


def wait_for_pause(run_name: str, timeout_s: float = 180):
    """The paused flow run of that name (other tests' runs may share it, none of them paused)."""
    deadline, paused = (
        time.monotonic() + timeout_s,
        FlowRunFilter(
            name=FlowRunFilterName(any_=[run_name]),
            state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"])),
        ),
    )
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if runs := client.read_flow_runs(flow_run_filter=paused):
                return runs[0]
            time.sleep(1)
    raise AssertionError(f"no flow run {run_name} paused within {timeout_s:g} s")


def test_a_promotion_waits_for_a_person_and_is_recorded_with_who_and_why(registry):
    settings, candidate = registry
    first = candidate(1, passed())
    assert promote_candidate(settings.policy_model_name, first, settings).status == "promoted"  # approval: auto
    second = candidate(2, passed(f"models:/promo-policy/{first}"))

    results = {}
    waiting = threading.Thread(
        target=lambda: results.update(outcome=promote_candidate(settings.policy_model_name, second, person(settings)))
    )
    waiting.start()
    paused = wait_for_pause(f"promo-policy-v{second}")
    client = MlflowClient()
    assert champion(settings) == first  # nothing moves while the person has not answered
    assert client.get_model_version("promo-policy", second).tags["promotion.outcome"] == "waiting for approval"
    resume_flow_run(
        paused.id,
        run_input={
            "approve": True,
            "approved_by": "Ada Lovelace",
            "reason": "read the held-out answers; the format gains are real",
        },
    )
    waiting.join(120)
    assert results["outcome"].status == "promoted" and champion(settings) == second

    version = client.get_model_version("promo-policy", second)
    assert version.tags["promotion.approved_by"] == "Ada Lovelace"
    assert version.tags["promotion.approval_reason"].startswith("read the held-out answers")
    assert version.tags["promotion.decided_at"] and version.tags["promotion.previous_champion"] == first
    assert version.tags["promotion.lc_improvement_ci"] == "[0.100000, 0.500000]"  # the verdict, with its interval
    assert version.tags["judge.helpfulness.heard"] == "True" and version.tags["git.commit"] == "abc123"
    assert "approved by Ada Lovelace" in version.description and "Judges heard: helpfulness" in version.description
    assert "0.300 [0.100, 0.500]" in version.description
    old = client.get_model_version("promo-policy", first).tags
    assert old["superseded_by"] == second and old["superseded_at"] == version.tags["promotion.decided_at"]

    # The card beside the MLmodel the version points at: licence, base model, data, the gate's figures.
    card = yaml.safe_load((Path(version.source) / "model_card_data.yaml").read_text())
    assert card["base_model"] == TAGS["base_model"] and card["datasets"] == ["synthetic:instructions"]
    assert card["license"] == "apache-2.0" and card["library_name"] == "transformers"
    metrics = {m["type"]: m["value"] for m in card["model-index"][0]["results"][0]["metrics"]}
    assert metrics["lc_improvement"] == 0.3 and metrics["judge.helpfulness.accuracy"] == 0.86


def test_a_person_can_say_no_and_the_gate_cannot_be_overruled(registry):
    settings, candidate = registry
    version = candidate(1, passed())
    results = {}
    waiting = threading.Thread(
        target=lambda: results.update(outcome=promote_candidate(settings.policy_model_name, version, person(settings)))
    )
    waiting.start()
    paused = wait_for_pause(f"promo-policy-v{version}")
    resume_flow_run(paused.id, run_input={"approve": False, "approved_by": "Grace", "reason": "wait for the real data"})
    waiting.join(120)
    assert results["outcome"].status == "rejected"
    tags = MlflowClient().get_model_version("promo-policy", version).tags
    assert (tags["promotion.outcome"], tags["promotion.decided_by"], tags["promotion.approval_reason"]) == (
        "rejected",
        "Grace",
        "wait for the real data",
    )
    with pytest.raises(MlflowException, match="champion"):
        MlflowClient().get_model_version_by_alias("promo-policy", "champion")

    worse = candidate(2, decide_promotion(gate(-0.4, -0.2, -0.05), PromotionSettings()))
    outcome = promote_candidate(settings.policy_model_name, worse, settings, "Grace", "I like it anyway")
    assert outcome.status == "not promoted" and "did not pass" in outcome.message


def test_two_concurrent_promotions_cannot_both_win(registry):
    settings, candidate = registry
    first = candidate(1, passed())
    promote(settings.policy_model_name, first, passed(), "champion", "test", "first")
    rivals = [candidate(n, passed(f"models:/promo-policy/{first}")) for n in (2, 3)]  # both judged against v1
    start, results = threading.Barrier(2), {}

    def race(version: str) -> None:
        start.wait()
        try:
            results[version] = promote(
                settings.policy_model_name,
                version,
                passed(f"models:/promo-policy/{first}"),
                "champion",
                "racer",
                "race",
            ).status
        except PromotionRefused as refused:
            results[version] = str(refused)

    threads = [threading.Thread(target=race, args=(version,)) for version in rivals]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    winners = [version for version, result in results.items() if result == "promoted"]
    assert len(winners) == 1 and champion(settings) == winners[0], results
    [loser] = set(rivals) - set(winners)
    assert "another run promoted meanwhile" in results[loser] and f"now v{winners[0]}" in results[loser]
    assert MlflowClient().get_model_version("promo-policy", first).tags["superseded_by"] == winners[0]

    # The lock itself: while one holder has the model's slot, a promotion waits, then proceeds.
    third = candidate(4, passed(f"models:/promo-policy/{winners[0]}"))
    done = threading.Event()
    blocked = threading.Thread(
        target=lambda: (
            promote(
                settings.policy_model_name,
                third,
                passed(f"models:/promo-policy/{winners[0]}"),
                "champion",
                "patient",
                "waited",
            ),
            done.set(),
        )
    )
    with promotion_lock(settings.policy_model_name):
        blocked.start()
        assert not done.wait(2) and champion(settings) == winners[0]  # held back by the lock
    blocked.join(120)
    assert done.is_set() and champion(settings) == third
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(lock_name("promo-policy")).limit == 1


class Receiver(BaseHTTPRequestHandler):
    posts: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        Receiver.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def webhook():
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Receiver.posts = []
    CustomWebhookNotificationBlock(
        name="preftune",
        url=f"http://127.0.0.1:{server.server_port}/hook",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    ).save("preftune-test", overwrite=True)
    yield Receiver.posts
    server.shutdown()
    server.server_close()


def test_every_verdict_reaches_a_local_webhook(registry, webhook):
    settings, candidate = registry
    told = settings.model_copy(update={"promotion": PromotionSettings(notify_block="custom-webhook/preftune-test")})
    first = candidate(1, passed())
    not_shown = candidate(
        2, decide_promotion(gate(-0.1, 0.1, 0.3, f"models:/promo-policy/{first}"), PromotionSettings())
    )
    stale = candidate(3, passed())  # judged against its reference, but v1 is champion by then
    for version in (first, not_shown, stale):
        promote_candidate(settings.policy_model_name, version, told)
    subjects = [post["subject"] for post in webhook]
    assert subjects == [
        f"preftune: promo-policy v{first} promoted (verdict: improved)",
        f"preftune: promo-policy v{not_shown} not promoted (verdict: not shown)",
        f"preftune: promo-policy v{stale} refused (verdict: improved)",
    ]
    assert "is now @champion" in webhook[0]["body"] and "lower bound at or below 0" in webhook[1]["body"]
    assert "another run promoted meanwhile" in webhook[2]["body"] and champion(settings) == first

    # A person's turn, with no promotion deployment on the server: the run says so, and how to promote.
    waiting = candidate(4, passed(f"models:/promo-policy/{first}"))
    tracking = person(told, notify_block="custom-webhook/preftune-test")
    outcome = training_step(_registered(waiting), passed(f"models:/promo-policy/{first}"), tracking)
    assert outcome.status == "waiting for approval" and "preftune promote" in outcome.message
    assert webhook[-1]["subject"] == f"preftune: promo-policy v{waiting} waiting for approval (verdict: improved)"
    assert champion(settings) == first


@flow(name="training-step")
def training_step(policy, decision, tracking):
    """The training flow's last step, on its own."""
    return start_promotion(policy, decision, tracking)


def _registered(version: str) -> RegisteredVersion:
    return RegisteredVersion(name="promo-policy", version=version, alias="candidate", source_run_id="")


def test_the_training_flow_records_the_verdict_where_it_registered_then_promotes(settings, register):
    """Registering records no verdict; the flow's promotion step records the gate's decision on the version
    and on the run that registered it (ended by then), then promotes. The version's description, its card
    and the flow's explanation state the verdict in the same words."""
    decision = passed()
    policy = register(1, decision)
    client = MlflowClient()
    assert "promotion.verdict" not in client.get_model_version("promo-policy", policy.version).tags
    outcome = training_step(policy, decision, settings)
    assert outcome.status == "promoted" and champion(settings) == policy.version

    version = client.get_model_version("promo-policy", policy.version)
    assert version.tags["promotion.verdict"] == "improved"
    assert version.tags["promotion.decision"] == f"runs:/{policy.register_run_id}/promotion/decision.json"
    run = client.get_run(policy.register_run_id).data
    assert run.tags["promotion.verdict"] == "improved" and run.metrics["promotion.promoted"] == 1.0
    assert run.metrics["promotion.lc_improvement.ci_low"] == 0.1
    statement = decision.statement()
    assert statement in version.description and statement in decision.explanation()
    assert statement in (Path(version.source) / "model_card.md").read_text()


def test_a_person_s_promotion_becomes_a_run_of_the_promotion_deployment(registry):
    """With the deployment on the server, the training flow only starts the promotion run and ends."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    settings, candidate = registry
    version = candidate(1, passed())
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name="promotion-test", type="process"))
        flow_id = client.create_flow_from_name("promote-candidate")
        deployment = client.create_deployment(
            flow_id=flow_id,
            name="promote-test",
            work_pool_name="promotion-test",
            entrypoint="flows/promotion.py:promote_candidate",
        )
    tracking = person(settings, deployment="promote-candidate/promote-test")
    outcome = training_step(_registered(version), passed(), tracking)
    assert outcome.status == "waiting for approval" and "promote-candidate/promote-test" in outcome.message
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment]))
        )
    assert run.name == f"promo-policy-v{version}" and run.state.is_scheduled() and run.parameters["version"] == version
    assert run.parameters["tracking"]["promotion"]["approval"] == "person"
    with pytest.raises(MlflowException, match="champion"):
        MlflowClient().get_model_version_by_alias("promo-policy", "champion")
