"""Profiles, overrides and validation of the pipeline configuration."""

from __future__ import annotations

import pytest

from flows.cli import main
from flows.config import PipelineConfig, build_config, load_config, profile_names
from tasks.base import PreftuneError
from tasks.settings.models import LoraSettings
from tasks.settings.training import PolicySettings


def test_profiles_exist_and_validate():
    assert profile_names() == ["book", "quickstart", "sample-data", "smoke"]
    for name in profile_names():
        assert load_config(name).profile == name


def test_each_layer_overrides_the_one_below_key_by_key(tmp_path):
    """Class defaults, then the profile, then a user's file, then --set: each wins for the keys it names
    and keeps the rest of the layer below (nested settings and the rewards' aspects are merged)."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("policy:\n  learning_rate: 3.0e-5\n  max_steps: 100\n")
    book = load_config("book")
    config = load_config("book", str(mine), ["policy.max_steps=7", "rewards.style.judge=some/reward-model"])
    assert config.policy.max_steps == 7 and config.policy.learning_rate == 3e-5  # --set over the file over the profile
    assert config.policy.lora == book.policy.lora != LoraSettings()  # the profile's, over the default, kept
    assert config.policy.seed == PolicySettings().seed  # set by no layer: the default
    assert set(config.rewards) == set(book.rewards) | {"style"}  # an aspect added, the profile's kept
    assert config.rewards["helpfulness"] == book.rewards["helpfulness"]


def test_overrides_are_typed():
    changed = load_config("smoke", overrides=["policy.max_steps=7", "data.status_rule=only_ties", "run_name=mine"])
    assert changed.policy.max_steps == 7 and changed.data.status_rule == "only_ties"
    assert changed.resolved_run_name() == "mine" and load_config("smoke").resolved_run_name() == "smoke"


def test_config_file_is_applied_over_the_profile(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("policy:\n  beta: 0.2\n")
    assert load_config("smoke", str(path)).policy.beta == 0.2


@pytest.mark.parametrize(
    "override, message",
    [
        ("methods.dpoo.beta=0.2", "methods.dpoo: unknown method; choose one of dpo, "),
        ("method=ppo", "method: Input should be 'dpo', "),
        ("policy.max_steps=0", "policy.max_steps: Input should be greater than 0"),
        ("data.status_rule=ties", "data.status_rule: Input should be 'drop_ties', 'only_ties' or 'keep_all'"),
        ("rewards.helpfulness.learning_rate=fast", "rewards.helpfulness.learning_rate: Input should be a valid number"),
        ("rewards.Bad Name.weight=1", "rewards.Bad Name.\\[key\\]: String should match pattern"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(PreftuneError, match=message):
        load_config("smoke", overrides=[override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("policy.max_stepz=3", r"policy \(method dpo\): unknown setting max_stepz \(DPOConfig has no such field\)"),
        (
            "rewards.helpfulness.betaa=3",
            r"rewards.helpfulness: unknown setting betaa \(RewardConfig has no such field\)",
        ),
        (
            "methods.grpo.num_generation=3",
            r"methods.grpo: unknown setting num_generation \(GRPOConfig has no such field\)",
        ),
        ("sft.packingg=true", r"sft: unknown setting packingg \(SFTConfig has no such field\)"),
    ],
)
def test_unknown_trl_options_are_named_before_anything_runs(override, message):
    """The settings build without TRL; the flow's first step checks them against TRL's config classes."""
    from tasks.trainer import check_options

    config = load_config("smoke", overrides=[override, "sft.enabled=true"])
    with pytest.raises(PreftuneError, match=message):
        check_options(config)
    check_options(load_config("smoke", overrides=["sft.enabled=true", "methods.grpo.num_generations=2"]))


def test_cli_reports_bad_input_without_a_traceback(capsys):
    assert main(["config", "--profile", "nope"]) == 2
    assert main(["config", "--set", "policy.max_steps=-1"]) == 2
    err = capsys.readouterr().err
    assert "unknown profile 'nope'" in err and "policy.max_steps" in err and "Traceback" not in err


def test_flow_parameter_schema_is_the_config():
    """Prefect renders the flow's parameter as a form from this schema."""
    from prefect.utilities.callables import parameter_schema

    from flows.preference_tuning import preference_tuning

    schema = parameter_schema(preference_tuning)
    assert "config" in schema.properties
    assert set(PipelineConfig.model_fields) <= set(schema.definitions["PipelineConfig"]["properties"])


def test_partial_parameters_start_from_their_profile():
    """What a deployment or the UI form sends: only the differences from a profile."""
    config = PipelineConfig.model_validate({"profile": "book", "policy": {"max_steps": 50}})
    assert config.policy.max_steps == 50 and config.policy.lora.r == 64
    assert PipelineConfig() == load_config("quickstart")
    assert PipelineConfig.model_validate(config.model_dump()) == config


def test_judges_on_the_pipeline_data_need_questions_of_their_own():
    with pytest.raises(
        PreftuneError, match="rewards helpfulness train on the pipeline's data: set data.judge_fraction"
    ):
        load_config("smoke", overrides=["data.judge_fraction=0"])
    given = load_config("smoke", overrides=["data.judge_fraction=0", "rewards.helpfulness.judge=some/reward-model"])
    assert given.rewards["helpfulness"].judge == "some/reward-model"


def test_relative_data_files_are_read_from_the_data_root(tmp_path):
    config = load_config("sample-data", overrides=[f"data_root={tmp_path}"]).with_data_root()
    assert config.data.source == str(tmp_path / "orca_dpo_pairs.sample.jsonl")
    assert config.rewards["harmlessness"].data.source == str(tmp_path / "hh_rlhf_harmless_base.sample.jsonl")
    untouched = load_config("smoke", overrides=[f"data_root={tmp_path}"]).with_data_root()
    assert untouched.data.source == "synthetic"  # generated and hub sources are not files


@pytest.mark.parametrize(
    "override, message",
    [
        ("run_name=../../etc", "run_name: String should match pattern"),
        ("runs_dir=runs/../../elsewhere", "runs_dir: runs_dir may not contain '..'"),
    ],
)
def test_run_paths_cannot_escape(override, message):
    with pytest.raises(PreftuneError, match=message):
        load_config("smoke", overrides=[override])


def test_deployment_runs_stay_inside_the_runs_root(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_RUNS_ROOT", str(tmp_path / "runs"))
    assert load_config("smoke", overrides=[f"runs_dir={tmp_path / 'runs' / 'team-a'}"]).runs_dir.endswith("team-a")
    with pytest.raises(PreftuneError, match="runs_dir must lie inside PREFTUNE_RUNS_ROOT"):
        load_config("smoke", overrides=["runs_dir=/tmp/elsewhere"])


# Every credential shape redaction must catch (all values are made up), and look-alikes it must leave alone.
CREDENTIALS = [
    ("https://alice:pa55word@mlflow.example.com", "https://***@mlflow.example.com"),
    ("postgresql://preftune:s3cret@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("redis://:hunter2pw@cache:6379/0", "redis://***@cache:6379/0"),
    ("s3://bucket/pairs.parquet?X-Amz-Signature=abc123&part=1", "s3://bucket/pairs.parquet?X-Amz-Signature=***&part=1"),
    ("hf_FAKEsecret0123456789abcdefXYZ", "***"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKEKEY", "AWS_SECRET_ACCESS_KEY=***"),
    ("export HF_TOKEN=abc123notreal && run", "export HF_TOKEN=*** && run"),
    ("password=hunter2 user=bob", "password=*** user=bob"),
    ('{"api_key": "abcd1234efgh"}', '{"api_key": "***"}'),
    ("Authorization: Bearer abc.def.ghi-1234567890", "Authorization: ***"),
    ("curl -H 'authorization: token ghp_notarealtoken0123456789abcd'", "curl -H 'authorization: ***'"),
    ("sent Bearer 0123456789abcdefABCDEF to the server", "sent Bearer *** to the server"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "***"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA75notreal\n-----END RSA PRIVATE KEY-----", "***"),
    ("key sk-proj-abcdefghijklmnop0123", "key ***"),
    ("ghs_16C7e42F292c6912E7710c838347Ae178B4a", "***"),
    ("pnu_abcdefghijklmnopqrstuvwxyz0123456789", "***"),
    ("AKIAIOSFODNN7EXAMPLE", "***"),
    # look-alikes stay as they are
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("tokenizer=HuggingFaceTB/SmolLM2 max_new_tokens=48", "tokenizer=HuggingFaceTB/SmolLM2 max_new_tokens=48"),
    ("models:/preftune-policy@champion", "models:/preftune-policy@champion"),
]


@pytest.mark.parametrize("secret, shown", CREDENTIALS)
def test_credentials_are_redacted(secret, shown):
    from tasks.base import redact

    assert redact(secret) == shown


def test_log_records_are_redacted_whatever_the_logger(caplog):
    import logging

    from tasks.base import redact_logs

    redact_logs()
    redact_logs()  # once is enough, twice changes nothing
    for secret, shown in CREDENTIALS:
        with caplog.at_level(logging.INFO):
            logging.getLogger("some.library").info("connecting with %s", secret)
        assert caplog.records[-1].getMessage() == f"connecting with {shown}"


def test_settings_that_may_hold_credentials_are_redacted_in_their_json_and_refused_back():
    """Prefect records (and shows) a flow run's parameters as their JSON; a deployment file holds the same."""
    from flows.preference_tuning import preference_tuning

    places = (
        "tracking.tracking_uri",
        "data.source",
        "data.data_dir",
        "rewards.helpfulness.judge",
        "model.base_model",
        "model.tokenizer.chat_template_from",
        "evaluation.referees.ref.model",
    )
    for secret, shown in CREDENTIALS[:4]:  # the shapes a URI-valued setting can take
        for key in places:
            config = load_config("smoke", overrides=[f"{key}={secret}"])
            recorded = preference_tuning.serialize_parameters({"config": config})["config"]  # what Prefect records
            value = recorded
            for part in key.split("."):
                value = value[part]
            assert value == shown and secret not in str(recorded)
            with pytest.raises(PreftuneError, match=rf"{key}: a redacted credential .* through its environment"):
                build_config(recorded)


def test_a_run_folder_that_is_a_symlink_is_refused_and_gc_never_follows_one(tmp_path, tracking_uri):
    from tasks.base import Workspace
    from tasks.cleanup import collect_garbage

    elsewhere = tmp_path / "elsewhere" / "stage" / "0123abcd"
    elsewhere.mkdir(parents=True)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PreftuneError, match="is a symbolic link"):
        Workspace.open(runs / "linked")
    (runs / "real" / "stage").mkdir(parents=True)
    (runs / "real" / "stage" / "linked-key").symlink_to(elsewhere)
    report = collect_garbage(runs, dry_run=False)
    assert report.removed == [] and elsewhere.is_dir()  # nothing behind a link was counted or deleted


def undescribed_settings(schema: dict) -> list[str]:
    """`Model.field` for every property of the schema's top level and of each of its `$defs` models
    that has no description: what Prefect's deployment form would show as a bare name."""
    models = {schema.get("title", "top level"): schema} | schema.get("$defs", {})
    return [
        f"{name}.{field}"
        for name, model in models.items()
        for field, spec in model.get("properties", {}).items()
        if not spec.get("description", "").strip()
    ]


def test_undescribed_settings_are_found():
    from pydantic import BaseModel, Field

    class Inner(BaseModel):
        said: int = Field(1, description="Has one.")
        bare: int = 2

    class Outer(BaseModel):
        inner: Inner = Field(default_factory=Inner, description="Has one too.")
        nameless: str = "x"

    assert undescribed_settings(Outer.model_json_schema()) == ["Outer.nameless", "Inner.bare"]


def test_every_setting_is_described_for_the_deployment_form():
    """The CLI's `config`, the README and Prefect's parameter form all read `Field(description=...)`."""
    missing = undescribed_settings(PipelineConfig.model_json_schema())
    assert not missing, f"{len(missing)} settings have no Field(description=...): {', '.join(missing)}"


def test_descriptions_survive_the_forms_markdown():
    """Prefect's form renders a description as Markdown: a bare `<name>` is taken for an HTML tag and
    vanishes (`package:<module>/<file>.gguf` showed as `package:/.gguf`); in backticks it shows as written."""
    import re

    schema = PipelineConfig.model_json_schema()
    lost = [
        f"{name}.{field}"
        for name, model in ({"PipelineConfig": schema} | schema["$defs"]).items()
        for field, spec in model.get("properties", {}).items()
        if re.search(r"<[^<>`]*>", re.sub(r"`[^`]*`", "", spec.get("description", "")))
    ]
    assert not lost, f"put the <placeholders> of these descriptions in backticks: {', '.join(lost)}"


def test_deployments_start_the_run_form_from_their_whole_profile(tmp_path):
    """Prefect's form sends every field it shows: registered as the bare profile name, an untouched
    Custom run of `smoke` would send class defaults (the real model, the real registry names)."""
    import yaml

    from flows.deployments import resolved_prefect_file

    spec = yaml.safe_load(resolved_prefect_file(tmp_path / "prefect.yaml").read_text())
    trained = {
        d["name"]: d["parameters"]["config"] for d in spec["deployments"] if "config" in (d.get("parameters") or {})
    }
    assert set(trained) == {"nightly-quickstart", "smoke", "book-gpu"}
    for sent in trained.values():
        profile = load_config(sent["profile"])
        assert build_config(sent) == profile  # what an untouched form sends back is the profile
    smoke = trained["smoke"]
    assert smoke["model"]["random_init"] and smoke["tracking"]["policy_model_name"] == "preftune-smoke-policy"
    edited = build_config(smoke | {"policy": smoke["policy"] | {"max_steps": 7}})
    assert edited.policy.max_steps == 7 and edited.model.random_init == load_config("smoke").model.random_init
