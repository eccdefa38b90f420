"""Every preference method through the whole smoke flow, and the table that defines them."""
from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from flows.config import load_config
from flows.preference_tuning import preference_tuning
from tasks.methods import METHODS


@pytest.mark.parametrize("name", METHODS)
def test_each_row_names_real_trl_classes_and_options(name):
    method = METHODS[name]
    assert method.trainer_class().__name__.endswith("Trainer")
    assert set(method.defaults) <= method.config_fields()
    assert not method.data_only & method.config_fields()  # only what the config really lacks is held back


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One runs folder and MLflow store for every method: the data and reward stages run once and are
    reused (cached) by the others, as a user trying methods one after another would see."""
    root = tmp_path_factory.mktemp("methods")
    return root, f"sqlite:///{root / 'mlflow.db'}"


@pytest.mark.parametrize("name", METHODS)
def test_smoke_flow_trains_evaluates_and_registers_each_method(name, store, coin_judge_path):
    root, uri = store
    # Online methods also get TRL's overlong penalty and a referee (a judge at chance: it must earn its say).
    online = [f"methods.{name}.overlong_penalty_tokens=4",
              f"evaluation.referees.coin.model={coin_judge_path}"] if METHODS[name].online else []
    config = load_config("smoke", overrides=[f"method={name}", f"runs_dir={root / 'runs'}",
                                             f"tracking.tracking_uri={uri}", *online])
    summary = preference_tuning(config)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()

    policy = next(v for v in summary.registered if v.name == config.tracking.policy_model_name)
    version = client.get_model_version(policy.name, policy.version)
    assert version.tags["method"] == name
    parent = client.get_run(summary.mlflow_run_id)
    assert parent.data.tags["preftune.method"] == name
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trained = next(run for run in children if run.data.tags["preftune.stage"] == name)
    assert trained.info.status == "FINISHED" and trained.data.metrics["train_loss"] == trained.data.metrics["train_loss"]

    evaluated = next(run for run in children if run.data.tags["preftune.stage"] == "evaluate")
    assert evaluated.data.params["evaluate.method"] == name
    assert "helpfulness.win_rate.ci_low" in summary.metrics and "helpfulness.lc_improvement" in summary.metrics
    if METHODS[name].online:  # the rewards it climbed cannot certify it, and no referee was given
        assert summary.promotion.verdict == "no evidence" and not summary.promotion.promoted
        judged = {j.aspect: j for j in summary.promotion.gate.judges}
        assert all(judged[a].training_reward and not judged[a].heard for a in config.rewards)
        assert judged["coin"].referee and not judged["coin"].training_reward and "coin.win_rate" in summary.metrics
        assert judged["coin"].heard == (summary.metrics["coin.pairwise_accuracy.ci_low"] > 0.5)
    if METHODS[name].implicit_reward:
        pairs, accuracy = summary.metrics["implicit_reward.pairs"], summary.metrics["implicit_reward.accuracy"]
        assert pairs == parent.data.metrics["data.rows_eval"] > 0  # every held-out pair scored
        assert accuracy * pairs == pytest.approx(round(accuracy * pairs))  # a share of those pairs
    else:
        assert "implicit_reward.accuracy" not in summary.metrics

    if METHODS[name].online:  # scored by each aspect's reward model, recorded on the policy's version
        assert "rewards/overlong/mean" in trained.data.metrics  # TRL's soft overlong punishment, asked for above
        for aspect in config.rewards:
            assert f"rewards/{aspect}/mean" in trained.data.metrics
            reward = next(v for v in summary.registered if v.name.endswith(f"-{aspect}"))
            assert version.tags[f"reward.{aspect}"] == f"models:/{reward.name}/{reward.version}"
        assert float(trained.data.params["beta"]) > 0 and "kl" in trained.data.metrics  # KL to the reference
