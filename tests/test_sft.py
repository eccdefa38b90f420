"""The recipe's SFT: its own conversations, from a base model that has no chat template of its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tasks.base import PreftuneError
from tasks.models import ModelSettings, ResolvedModel, TokenizerSettings, load_tokenizer
from tasks.sft import ChatDataSettings, SFTSettings, load_chat, train_sft_adapter
from tasks.tracking import TrackingSettings, configure


def conversations(path, rows: int = 40) -> str:
    """Short arithmetic chats in the `messages` format of ultrachat_200k."""
    with open(path, "w") as handle:
        for index in range(rows):
            a, b = index, 2 * index + 3
            handle.write(
                json.dumps(
                    {
                        "prompt_id": str(index),
                        "messages": [
                            {"role": "user", "content": f"What is {a} plus {b}?"},
                            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                        ],
                    }
                )
                + "\n"
            )
    return str(path)


@pytest.fixture()
def base_without_template(tiny_model_path, tmp_path) -> str:
    """A copy of the tiny model whose tokenizer has no chat template, as TinyLlama's base model."""
    folder = tmp_path / "base"
    shutil.copytree(tiny_model_path, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def test_chat_data_is_a_seeded_sample_checked_row_by_row(tmp_path):
    source = conversations(tmp_path / "chats.jsonl")
    first = load_chat(ChatDataSettings(source=source, rows=24, eval_rows=4), tmp_path / "a")
    again = load_chat(ChatDataSettings(source=source, rows=24, eval_rows=4), tmp_path / "b")
    other = load_chat(ChatDataSettings(source=source, rows=24, eval_rows=4, seed=7), tmp_path / "c")
    assert (first.train.rows, first.eval.rows) == (24, 4)
    assert first.train.sha256 == again.train.sha256 != other.train.sha256

    with open(source, "a") as handle:
        handle.write(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(PreftuneError, match=r"chats.jsonl, row 40, column 'messages': no assistant turn"):
        load_chat(ChatDataSettings(source=source), tmp_path / "d")
    with pytest.raises(PreftuneError, match="fewer than the 100 asked for"):
        load_chat(ChatDataSettings(source=conversations(tmp_path / "few.jsonl"), rows=96, eval_rows=4), tmp_path / "e")


def test_sft_trains_on_conversations_with_a_borrowed_chat_template(
    base_without_template, tiny_model_path, tmp_path, tracking_uri
):
    configure(TrackingSettings())
    settings = SFTSettings(
        enabled=True,
        chat_data=ChatDataSettings(source=conversations(tmp_path / "chats.jsonl"), rows=24, eval_rows=4),
        max_steps=3,
        per_device_train_batch_size=4,
        max_length=64,
        logging_steps=1,
        save_steps=3,
    )
    tokenizer = TokenizerSettings(chat_template_from=tiny_model_path, pad_token="<|endoftext|>", padding_side="left")
    model = ResolvedModel(path=base_without_template, settings=ModelSettings(tokenizer=tokenizer))
    with pytest.raises(PreftuneError, match="has no chat template"):  # the base alone cannot render chats
        load_tokenizer(base_without_template, ModelSettings())
    with pytest.raises(PreftuneError, match="pad_token '<PAD>' is not in the vocabulary"):
        load_tokenizer(
            base_without_template, ModelSettings(tokenizer=tokenizer.model_copy(update={"pad_token": "<PAD>"}))
        )

    result = train_sft_adapter(settings, model, load_chat(settings.chat_data, tmp_path / "data"), tmp_path / "sft")
    merged = AutoTokenizer.from_pretrained(result.model_dir)  # what the policy stage starts from
    assert merged.chat_template == AutoTokenizer.from_pretrained(tiny_model_path).chat_template
    assert merged.pad_token == "<|endoftext|>" and model.tokenizer().padding_side == "left"
    history = json.loads((tmp_path / "sft" / "fit.json").read_text())["history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3]


@pytest.mark.slow(minutes=0.4)
def test_flow_runs_sft_on_its_own_conversations_then_the_policy_from_it(tmp_path, coin_judge_path):
    from mlflow import MlflowClient

    from flows.config import load_config
    from flows.preference_tuning import preference_tuning

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(
        "smoke",
        overrides=[  # the judges are given: training them is not what is tested
            f"sft.chat_data.source={conversations(tmp_path / 'chats.jsonl')}",
            "sft.chat_data.rows=24",
            "sft.chat_data.eval_rows=4",
            f"runs_dir={tmp_path / 'runs'}",
            f"tracking.tracking_uri={uri}",
            f"rewards.helpfulness.judge={coin_judge_path}",
            f"rewards.harmlessness.judge={coin_judge_path}",
        ],
    )
    summary = preference_tuning(config)
    client = MlflowClient(uri)
    parent = client.get_run(summary.mlflow_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {"sft", "dpo"} <= {run.data.tags["preftune.stage"] for run in children}
    chats = next(Path(summary.run_dir).glob("data-sft/*/train.jsonl"))
    assert len(chats.read_text().splitlines()) == 24 and '"messages"' in chats.read_text()
    assert next(Path(summary.run_dir).glob("sft/*/model/model/config.json"))  # DPO started from the merged SFT model
