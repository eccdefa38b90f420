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


@pytest.mark.parametrize("name, content, message", [
    ("latin1.jsonl", b'{"chosen": "a", "rejected": "b"}\n{"chosen": "caf\xe9", "rejected": "b"}\n',
     r"latin1.jsonl: line 2 is not UTF-8 text"),
    ("list.jsonl", b'{"chosen": "a", "rejected": "b"}\n\n["a", "b"]\n', r"list.jsonl: line 3 is a JSON list"),
    ("broken.parquet", b"PAR1 this is not parquet", r"broken.parquet: cannot read it as parquet"),
])
def test_unreadable_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PreftuneError, match=message):
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


def _argilla_file(tmp_path, rows: list[dict], name="pairs.jsonl"):
    base = {"system": "", "input": "q", "chosen": "good", "rejected": "bad", "status": "unchanged",
            "chosen_score": 9.0, "in_gsm8k_train": False}
    path = tmp_path / name
    path.write_text("".join(json.dumps(base | row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"chosen_score": "nine"}, r"row 1, column 'chosen_score': expected a number, found str 'nine'"),
    ({"in_gsm8k_train": "false"}, r"row 1, column 'in_gsm8k_train': expected true or false, found str 'false'"),
    ({"chosen": None}, r"row 1, column 'chosen': missing value \(null or NaN\)"),
    ({"input": None}, r"row 1, column 'input': missing value \(null or NaN\)"),
    ({"rejected": 3}, r"row 1, column 'rejected': expected text, found int 3"),
])
def test_wrong_types_and_missing_text_name_file_row_and_column(tmp_path, bad, message):
    path = _argilla_file(tmp_path, [{}, bad])
    with pytest.raises(PreftuneError, match=f"{path.name}, {message}"):
        load(DataSettings(source=str(path)), tmp_path)


def test_duplicates_and_identical_answers_are_dropped_and_counted(tmp_path):
    path = _argilla_file(tmp_path, [{}, {}, {"input": "q2"}, {"input": "q3", "rejected": "good"}])
    report = apply_filter(load(DataSettings(source=str(path)), tmp_path), DataSettings(), tmp_path)
    assert report.dropped["duplicate_pair"] == 1 and report.dropped["chosen_equals_rejected"] == 1
    assert report.rows == 2


def test_overlong_pairs_are_counted_then_truncated_or_dropped(tiny_model_path, tmp_path):
    rows = [{"input": f"question {i}"} for i in range(8)] + [{"input": "long " * 300}]
    path = _argilla_file(tmp_path, rows)
    tokenizer = load_tokenizer(tiny_model_path, ModelSettings())
    for policy, kept in (("truncate", 9), ("drop", 8)):
        settings = DataSettings(source=str(path), eval_fraction=0.5, overlong=policy, seed=3)
        report = apply_filter(load(settings, tmp_path), settings, tmp_path)
        parts = split(report, settings, tmp_path)
        formatted = format_split(parts, tokenizer, tmp_path / policy, max_length=64, overlong=policy)
        assert sum(formatted.overlong.values()) == 1
        assert formatted.train.rows + formatted.eval.rows == kept


def test_tokenizer_without_chat_template_is_refused(tiny_model_path, tmp_path):
    import shutil

    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_path, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(PreftuneError, match="has no chat template"):
        load_tokenizer(str(folder), ModelSettings())


def test_unknown_model_id_is_named(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail fast
    with pytest.raises(PreftuneError, match="cannot load the tokenizer of 'nobody/no-such-model'"):
        load_tokenizer("nobody/no-such-model", ModelSettings())
