"""Loading, filtering, splitting and formatting on the public samples and on generated data."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks.base import PreftuneError
from tasks.data import (DataSettings, apply_filter, format_split, load, parse_transcript, prompt_key, read_jsonl,
                        render_example, split)
from tasks.models import ModelSettings, load_tokenizer
from tasks.synthetic import generate_preferences


def test_orca_openai_format_maps_system_prompt_and_answers(shared_data, tmp_path):
    source = shared_data / "orca_dpo_pairs.sample.jsonl"
    loaded = load(DataSettings(source=str(source)), tmp_path)
    assert (loaded.format, loaded.rows) == ("openai_dpo", 184)
    first_source_row = json.loads(source.read_text().splitlines()[0])
    row = read_jsonl(loaded.path).iloc[0]
    assert row.system == first_source_row["input"]["messages"][0]["content"]
    assert row.prompt == [first_source_row["input"]["messages"][1]]
    assert row.chosen == first_source_row["preferred_output"][0]["content"]
    assert row.rejected == first_source_row["non_preferred_output"][0]["content"]


def test_hh_rlhf_prompt_is_the_shared_transcript_prefix(shared_data, tmp_path):
    loaded = load(DataSettings(source=str(shared_data / "hh_rlhf_harmless_base.sample.jsonl")), tmp_path)
    assert (loaded.format, loaded.rows) == ("hh_rlhf", 2112)
    frame = read_jsonl(loaded.path)
    row = frame.iloc[0]
    assert row.prompt[0]["role"] == "user" and row.prompt[0]["content"].startswith("what are some pranks with a pen")
    assert row.prompt[-1]["role"] == "user"  # the last turn before the answers is the human's
    assert not row.chosen.startswith("Assistant:") and row.chosen != row.rejected
    # SOURCES.md: 4 rows have differing prefixes and 4 an empty chosen reply; the filter drops them.
    assert int(frame.prompt_mismatch.sum()) == 4
    report = apply_filter(loaded, DataSettings(), tmp_path)
    assert report.dropped["prompt_mismatch"] == 4
    assert report.dropped["empty_response"] >= 4
    assert report.rows == 2112 - sum(report.dropped.values())


def test_parse_transcript_turns():
    messages = parse_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:")
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "bye"}, {"role": "assistant", "content": ""}]


def test_argilla_schema_from_parquet_and_csv(tmp_path):
    frame = pd.DataFrame(generate_preferences(40, seed=3))
    for suffix, write in ((".parquet", frame.to_parquet), (".csv", frame.to_csv)):
        path = tmp_path / f"pairs{suffix}"
        write(path, index=False) if suffix == ".csv" else write(path)
        loaded = load(DataSettings(source=str(path)), tmp_path / suffix[1:])
        assert (loaded.format, loaded.rows) == ("argilla", 40)
        assert read_jsonl(loaded.path).prompt.iloc[0] == [{"role": "user", "content": frame.input.iloc[0]}]


def test_recipe_filter_counts_each_rule(tmp_path):
    rows = generate_preferences(400, seed=1)
    loaded = load(DataSettings(synthetic_rows=400, seed=1), tmp_path)
    report = apply_filter(loaded, DataSettings(), tmp_path)
    ties = sum(r["status"] == "tie" for r in rows)
    assert ties > 0 and report.dropped["status_tie"] == ties
    assert report.dropped["chosen_score_below_min"] > 0 and report.dropped["in_gsm8k_train"] > 0
    kept = read_jsonl(report.path)
    assert (kept.status != "tie").all() and (kept.chosen_score >= 8).all() and not kept.in_gsm8k_train.any()
    assert report.rows == 400 - sum(report.dropped.values())

    only_ties = apply_filter(loaded, DataSettings(status_rule="only_ties", min_chosen_score=None,
                                                  drop_in_gsm8k_train=False), tmp_path / "ties")
    assert only_ties.rows == ties and (read_jsonl(only_ties.path).status == "tie").all()


def test_filter_that_leaves_nothing_names_the_rules(tmp_path):
    loaded = load(DataSettings(synthetic_rows=30), tmp_path)
    with pytest.raises(PreftuneError, match="no rows left.*chosen_score_below_min"):
        apply_filter(loaded, DataSettings(min_chosen_score=11), tmp_path)


def test_split_is_seeded_and_keeps_prompts_apart(shared_data, tmp_path):
    settings = DataSettings(source=str(shared_data / "hh_rlhf_harmless_base.sample.jsonl"), eval_fraction=0.2)
    report = apply_filter(load(settings, tmp_path), settings, tmp_path)
    first, second = split(report, settings, tmp_path / "a"), split(report, settings, tmp_path / "b")
    assert first.train.sha256 == second.train.sha256 and first.eval.sha256 == second.eval.sha256
    train, held_out = read_jsonl(first.train.path), read_jsonl(first.eval.path)
    assert len(train) + len(held_out) == report.rows
    assert not set(train.apply(prompt_key, axis=1)) & set(held_out.apply(prompt_key, axis=1))


def test_format_is_trl_conversational_with_the_models_chat_template(tiny_model_path, tmp_path):
    settings = DataSettings(synthetic_rows=60)
    report = apply_filter(load(settings, tmp_path), settings, tmp_path)
    tokenizer = load_tokenizer(tiny_model_path, ModelSettings())
    formatted = format_split(split(report, settings, tmp_path), tokenizer, tmp_path)
    row = read_jsonl(formatted.train.path).iloc[0]
    assert row.prompt[-1]["role"] == "user" and row.chosen[0]["role"] == "assistant"
    rendered = render_example(formatted.train.path, tokenizer)
    assert "<|im_start|>user" in rendered and rendered.count("<|im_start|>assistant") == 1


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a", "rej\n')
    with pytest.raises(PreftuneError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load(DataSettings(source=str(path)), tmp_path)


def test_unknown_columns_list_what_was_found(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(PreftuneError, match=r"unrecognised columns \['answer', 'question'\]"):
        load(DataSettings(source=str(path)), tmp_path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PreftuneError, match="data file not found: .*nope.jsonl"):
        load(DataSettings(source=str(tmp_path / "nope.jsonl")), tmp_path)


def test_wrong_type_names_row_and_column(tmp_path):
    path = tmp_path / "typed.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p2", "chosen": 5, "rejected": "b"}\n')
    with pytest.raises(PreftuneError, match=r"row 1, column 'chosen': expected text"):
        load(DataSettings(source=str(path)), tmp_path)
