"""The whole `smoke` flow through Prefect, checked through MLflow's and Prefect's own APIs; then
`preftune gc` on the runs this module made (last: it removes what they left)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import mlflow
import pytest
from at_rest import ENVIRONMENT, PASSWORD, PLANTED, SIGNATURE, leaks, prefect_database
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings

from flows.cli import main
from flows.config import load_config
from flows.preference_tuning import preference_tuning
from tasks.cleanup import folder_bytes

STAGES = {"reward-helpfulness", "reward-harmlessness", "sft", "dpo", "evaluate", "register"}


async def _task_states(flow_run_id: str) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, tiny_model_path):
    """Two runs with the same settings (the second must reuse the first's finished stages), given
    credentials that must be neither recorded nor left at rest: in the environment (a Hugging Face token,
    MLflow's and AWS's secrets), a password in a data setting, a signed reference in a model setting the
    run really uses; every result persisted (PREFECT_RESULTS_PERSIST_BY_DEFAULT, as an operator may set it)."""
    root = tmp_path_factory.mktemp("smoke")
    template = root / f"chat-template?sig={SIGNATURE}"  # a signed reference to the template's tokenizer
    template.symlink_to(tiny_model_path)
    config = load_config(
        "smoke",
        overrides=[
            f"runs_dir={root / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"data.data_dir=https://alice:{PASSWORD}@hub.example.com/subset",
            f"model.tokenizer.chat_template_from={template}",
        ],
    )
    # Results in a folder of this module's own (the later tests' runs read them back), every one persisted
    # during the two runs.
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: root / "prefect-results"}):
        with pytest.MonkeyPatch.context() as patch, temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
            for name, value in ENVIRONMENT.items():
                patch.setenv(name, value)
            first = preference_tuning(config, return_state=True)
            second = preference_tuning(config, return_state=True)
        yield config, first, second


@pytest.mark.slow(minutes=1.3)
def test_smoke_flow_logs_runs_metrics_and_registers_models(smoke_runs):
    config, first, second = smoke_runs
    summary = first.result()
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    client = MlflowClient()

    parent = client.get_run(summary.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["method"] == "dpo" and parent.data.params["model.random_init.hidden_size"] == "64"
    assert parent.data.tags["prefect.flow_run_id"] == str(first.state_details.flow_run_id)
    assert len(parent.data.tags["data.sha256"]) == 64 and parent.data.tags["git.commit"]
    for metric in (
        "helpfulness.pairwise_accuracy",
        "harmlessness.pairwise_accuracy",
        "implicit_reward.accuracy",
        "implicit_reward.accuracy.ci_low",
        "helpfulness.lc_improvement.ci_high",
        "helpfulness.lc_win_rate",
        "harmlessness.length_correlation",
        "judges_heard",
        "mean_length_tuned",
        "merge.max_logit_difference",
        "data.rows_kept",
        "data.dropped.status_tie",
        "data-harmlessness.rows_kept",
    ):
        assert metric in parent.data.metrics, metric
    metrics = parent.data.metrics
    # The gate hears exactly the judges whose held-out lower bound clears 0.5, and says so on the version.
    heard = {a for a in config.rewards if metrics[f"{a}.pairwise_accuracy.ci_low"] > 0.5}
    assert {j.aspect for j in summary.promotion.gate.judges if j.heard} == heard
    assert (summary.promotion.verdict == "no evidence") == (not heard) and metrics["judges_heard"] == len(heard)
    assert ("combined.lc_improvement" in metrics) == bool(heard)
    assert metrics["data.shared_questions"] == 0 and metrics["data-harmlessness.shared_questions"] == 0
    assert (
        metrics["data.rows_train"] + metrics["data.rows_eval"] + metrics["data.rows_judge"] == metrics["data.rows_kept"]
    )
    assert metrics["implicit_reward.pairs"] == metrics["data.rows_eval"]
    assert metrics["generation_prompts"] == config.evaluation.generation_prompts
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {
        "data-train",
        "data-eval",
        "data-judge",
        "data-harmlessness-train",
        "data-harmlessness-eval",
    }
    example = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/data/data-example.txt")
    assert "[chosen]" in example and "<|im_start|>user" in example  # a pair as the model's chat template renders it
    plan_params = {key for key in parent.data.params if key.startswith("plan.dpo.")}
    assert {"plan.dpo.precision", "plan.dpo.micro_batch", "plan.dpo.estimated_peak_gib"} <= plan_params

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {run.data.tags["preftune.stage"] for run in children} == STAGES
    dpo_run = next(run for run in children if run.data.tags["preftune.stage"] == "dpo")
    assert len(client.get_metric_history(dpo_run.info.run_id, "loss")) == config.policy.max_steps

    assert {r.name for r in summary.registered} == {
        "preftune-smoke-policy",
        "preftune-smoke-reward-helpfulness",
        "preftune-smoke-reward-harmlessness",
    }
    policy = next(v for v in summary.registered if v.name == "preftune-smoke-policy")
    policy_tags = client.get_model_version(policy.name, policy.version).tags
    assert policy_tags["promotion.verdict"] == summary.promotion.verdict
    assert {policy_tags[f"judge.{a}.heard"] for a in config.rewards} == {str(a in heard) for a in config.rewards}
    for registered in summary.registered:
        version = client.get_model_version(registered.name, registered.version)
        assert version.tags["data.sha256"] == parent.data.tags["data.sha256"]
        assert version.tags["prefect.flow_run_id"] == str(first.state_details.flow_run_id)
    # `candidate` follows the newest run's versions.
    for registered in second.result().registered:
        assert str(client.get_model_version_by_alias(registered.name, "candidate").version) == registered.version


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_registered_policy_served_answers_as_evaluated_and_the_judge_scores_as_evaluated(smoke_runs, tmp_path):
    """`mlflow models serve` on the registered policy (a real server process): an OpenAI-style chat request
    gets the evaluation's recorded answer for that prompt, and `preftune generate` gets it too; a request's
    max_tokens is obeyed. The registered judge scores the pair as the evaluation did."""
    import os
    import subprocess
    import sys
    import time

    import requests

    from tasks.registry import generate, score

    config, first, _ = smoke_runs
    summary = first.result()
    example = read_examples(summary.report_path)[0]
    policy = f"models:/{config.tracking.policy_model_name}@candidate"
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": config.tracking.tracking_uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    server = subprocess.Popen(
        [
            str(bin_dir / "mlflow"),
            "models",
            "serve",
            "-m",
            policy,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "w"),  # noqa: SIM115 (the server's, while it lives)
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).ok:
                    break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "the model server did not start"
                time.sleep(1)
        invocations = f"http://127.0.0.1:{port}/invocations"
        [reply] = requests.post(invocations, json={"messages": example["messages"]}, timeout=120).json()
        answer = reply["choices"][0]["message"]
        assert reply["object"] == "chat.completion" and answer["role"] == "assistant"
        assert answer["content"] == example["tuned"]
        [short] = requests.post(
            invocations, json={"messages": example["messages"], "max_tokens": 2}, timeout=120
        ).json()
        assert short["usage"]["completion_tokens"] <= 2 and short["choices"][0]["finish_reason"] == "length"
    finally:
        server.terminate()
        server.wait(timeout=60)
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    system = next((m["content"] for m in example["messages"] if m["role"] == "system"), None)
    user = example["messages"][-1]["content"]
    assert generate(policy, user, config.evaluation.max_new_tokens, system) == example["tuned"]
    judge = f"models:/{config.tracking.reward_model_prefix}-helpfulness@candidate"
    assert score(judge, user, [example["tuned"]], config.evaluation.max_length, system)[0] == pytest.approx(
        example["tuned_helpfulness"], abs=1e-4
    )


def read_examples(report_path: str) -> list[dict]:
    """The evaluation's recorded answers, beside its report."""
    lines = (Path(report_path).parent / "examples.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_rerun_reuses_finished_stages(smoke_runs):
    _, first, second = smoke_runs
    states = asyncio.run(_task_states(str(second.state_details.flow_run_id)))
    for prefix in (
        "filter-data",
        "split-data",
        "format-data",
        "format-data-judge-helpfulness",
        "reward-helpfulness",
        "reward-harmlessness",
        "train-sft",
        "train-dpo",
        "record-",
        "merge-adapters",
        "evaluate",
    ):
        matching = [state for name, state in states.items() if name.startswith(prefix)]
        assert matching and set(matching) == {"Cached"}, states
    assert second.result().run_dir == first.result().run_dir
    # Nothing new registered, nothing copied: the same versions, found again.
    assert [(v.name, v.version) for v in second.result().registered] == [
        (v.name, v.version) for v in first.result().registered
    ]
    assert all(v.reused for v in second.result().registered) and not any(v.reused for v in first.result().registered)
    assert second.result().bytes_written < 5 * 2**20 < first.result().bytes_written


async def _prefect_records(flow_run_id: str) -> list[str]:
    """What Prefect keeps of a flow run and shows in its UI: its parameters and its logs."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [json.dumps(run.parameters), *(log.message for log in logs)]


def test_secrets_from_the_environment_are_not_recorded(smoke_runs, tmp_path):
    config, first, second = smoke_runs
    assert config.data.data_dir == f"https://alice:{PASSWORD}@hub.example.com/subset"  # the run had the real one
    shown = [
        text
        for state in (first, second)
        for text in asyncio.run(_prefect_records(str(state.state_details.flow_run_id)))
    ]
    assert len(shown) > 2 and not [text for text in shown if any(secret in text for secret in PLANTED)]
    assert "https://***@hub.example.com/subset" in shown[0]  # the flow run's parameter, as Prefect shows it
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("preftune").experiment_id])
    recorded = [json.dumps(run.data.params) + json.dumps(run.data.tags) for run in runs]
    for model in client.search_registered_models():
        recorded += [json.dumps(v.tags) for v in client.search_model_versions(f"name = '{model.name}'")]
    for run in runs:
        folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / run.info.run_id))
        recorded += [p.read_text(errors="ignore") for p in Path(folder).rglob("*") if p.is_file()]
    assert len(runs) >= 9 and len(recorded) > len(runs)  # 7 runs of the first flow run, 2 of the cached one
    assert not [text for text in recorded if any(secret in text for secret in PLANTED)]
    assert any("https://***@hub.example.com/subset" in text for text in recorded)  # the setting, redacted


def test_no_planted_secret_is_left_at_rest(smoke_runs):
    """Prefect's persisted results and cache records (the re-run's stages came from them), its database,
    every stage folder, the MLflow store and its artifacts: no planted credential in any file."""
    config, first, second = smoke_runs
    assert config.model.tokenizer.chat_template_from.endswith(SIGNATURE)  # the run had the real value
    root = Path(config.runs_dir).parent
    results = root / "prefect-results"
    assert PREFECT_LOCAL_STORAGE_PATH.value() == results
    assert len(list(results.iterdir())) > 20  # every task's result, and the flow's
    assert leaks(results, root / "runs", root / "mlflow.db", root / "artifacts", *prefect_database()) == {}


def test_a_changed_setting_reruns_only_the_stages_it_affects(smoke_runs):
    config, _, _ = smoke_runs
    changed = config.model_copy(update={"policy": config.policy.model_copy(update={"beta": 0.2})})
    state = preference_tuning(changed, return_state=True)
    states = asyncio.run(_task_states(str(state.state_details.flow_run_id)))
    for prefix in ("filter-data", "reward-helpfulness", "reward-harmlessness", "train-sft"):
        assert {s for name, s in states.items() if name.startswith(prefix)} == {"Cached"}, states
    for prefix in ("train-dpo", "merge-adapters", "evaluate"):
        assert {s for name, s in states.items() if name.startswith(prefix)} == {"Completed"}, states


def test_a_new_tracking_store_gets_every_stage_run_without_retraining(smoke_runs, tmp_path):
    """A stage's key holds no tracking store: with a new store every training stage is found done (Prefect's
    cache, the same folders, nothing written again) and only the recording steps run, into the new store."""
    config, first, _ = smoke_runs

    # What a training stage writes only when it trains: its record and its adapter's files.
    def written(record: Path):
        return record.read_bytes(), sorted(
            (f.name, f.stat().st_mtime_ns) for f in (record.parent / "adapter").iterdir()
        )

    trained = {record: written(record) for record in Path(first.result().run_dir).glob("*/*/fit.json")}
    assert {"dpo", "sft", "reward-helpfulness", "reward-harmlessness"} <= {r.parent.parent.name for r in trained}
    new_store = f"sqlite:///{tmp_path / 'new.db'}"
    moved = config.model_copy(update={"tracking": config.tracking.model_copy(update={"tracking_uri": new_store})})
    state = preference_tuning(moved, return_state=True)
    summary = state.result()
    assert {record: written(record) for record in trained} == trained  # nothing was trained again
    states = asyncio.run(_task_states(str(state.state_details.flow_run_id)))
    for prefix in ("reward-helpfulness", "reward-harmlessness", "train-sft", "train-dpo", "merge-adapters"):
        assert {s for name, s in states.items() if name.startswith(prefix)} == {"Cached"}, states
    assert {s for name, s in states.items() if name.startswith("record-")} == {"Completed"}, states
    client = MlflowClient(tracking_uri=new_store)
    parent = client.get_run(summary.mlflow_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {run.data.tags["preftune.stage"] for run in children} == STAGES
    dpo_run = next(run for run in children if run.data.tags["preftune.stage"] == "dpo")
    assert [m.step for m in client.get_metric_history(dpo_run.info.run_id, "loss")] == list(
        range(1, config.policy.max_steps + 1)
    )
    assert dpo_run.data.params["max_steps"] == str(config.policy.max_steps)  # the TRL config it trained with
    assert summary.metrics["implicit_reward.accuracy"] == first.result().metrics["implicit_reward.accuracy"]


def test_gc_keeps_registered_models_and_the_next_run_recreates_the_rest(smoke_runs, monkeypatch, capsys):
    """What no registered version needs goes; what one needs stays; the next run still works. Last in this
    module: the runs above (two settings of DPO, the same judges) are what it cleans up."""
    config, first, _ = smoke_runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking.tracking_uri)  # the store gc reads
    runs, run_dir = Path(config.runs_dir), Path(first.result().run_dir)
    token = (run_dir / ".workspace-token").read_text()
    assert not list(run_dir.glob("*/*/checkpoints"))  # finished stages dropped their checkpoints already
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    versions = [
        v for model in client.search_registered_models() for v in client.search_model_versions(f"name = '{model.name}'")
    ]
    assert len(versions) == 4  # the policy of each DPO setting and the two judges

    assert main(["gc", "--runs-dir", str(runs), "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and (run_dir / ".workspace-token").read_text() == token
    before = folder_bytes(run_dir)
    assert main(["gc", "--runs-dir", str(runs)]) == 0
    printed = capsys.readouterr().out
    assert (
        folder_bytes(run_dir) < before and f"kept {len(versions)} that registered model versions point into" in printed
    )
    for version in versions:  # every registered version still loads from its folder
        source = Path(version.source)
        weights = source / (
            "peft/adapter_config.json"
            if version.name.startswith(config.tracking.reward_model_prefix)
            else "model/config.json"
        )
        assert (source / "MLmodel").is_file() and weights.is_file()  # a judge: its adapter, over the cached base
    assert not list(run_dir.glob("dpo/*")) and not list(run_dir.glob("sft/*")) and not list(run_dir.glob("data/*"))
    assert (run_dir / ".workspace-token").read_text() != token  # cached results naming removed folders expire

    again = preference_tuning(config)  # re-creates what it needs; the same models come out again
    assert [(v.name, v.version, v.reused) for v in again.registered] == [
        (v.name, v.version, True) for v in first.result().registered
    ]
