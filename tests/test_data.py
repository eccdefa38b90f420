"""Loading, filtering, splitting and formatting on the public samples and on generated data."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks.base import PreftuneError
from tasks.data import apply_filter, fit_pair, format_split, load, question_keys, read_jsonl, render_example, split
from tasks.models import load_tokenizer
from tasks.schemas import parse_transcript
from tasks.settings.data import DataSettings
from tasks.settings.models import ModelSettings
from tasks.synthetic import generate_instruction_preferences, generate_preferences, generate_safety_preferences


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
    assert messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": ""},
    ]


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

    only_ties = apply_filter(
        loaded,
        DataSettings(status_rule="only_ties", min_chosen_score=None, drop_in_gsm8k_train=False),
        tmp_path / "ties",
    )
    assert only_ties.rows == ties and (read_jsonl(only_ties.path).status == "tie").all()


def test_filter_that_leaves_nothing_names_the_rules(tmp_path):
    loaded = load(DataSettings(synthetic_rows=30), tmp_path)
    with pytest.raises(PreftuneError, match="no rows left.*chosen_score_below_min"):
        apply_filter(loaded, DataSettings(min_chosen_score=11), tmp_path)


def _questions(path) -> set[str]:
    return set().union(*map(question_keys, read_jsonl(path).prompt))


def test_split_is_seeded_and_keeps_questions_apart(shared_data, tmp_path):
    """hh-rlhf: many conversations share an opening question; none may be in two splits."""
    settings = DataSettings(
        source=str(shared_data / "hh_rlhf_harmless_base.sample.jsonl"), eval_fraction=0.2, judge_fraction=0.3
    )
    report = apply_filter(load(settings, tmp_path), settings, tmp_path)
    first, second = split(report, settings, tmp_path / "a"), split(report, settings, tmp_path / "b")
    assert first.train.sha256 == second.train.sha256 and first.eval.sha256 == second.eval.sha256
    assert first.train.rows + first.eval.rows + first.judge.rows == report.rows
    assert abs(first.eval.rows / report.rows - 0.2) < 0.03 and abs(first.judge.rows / report.rows - 0.3) < 0.03
    train, held_out, judges = (_questions(part.path) for part in (first.train, first.eval, first.judge))
    assert not (train & held_out) and not (judges & held_out) and not (train & judges)
    assert first.shared_questions == 0


def test_same_question_with_another_system_prompt_stays_in_one_split(tmp_path):
    rows = [
        {"input": f"Question {i}?", "system": system, "chosen": f"good {i} {system}", "rejected": "bad"}
        for i in range(30)
        for system in ("", "You are terse.", "You are kind.")
    ]
    rows += [
        {"input": "  question 3 ", "system": "Other.", "chosen": "good again", "rejected": "bad"}
    ]  # same, respaced
    path = _argilla_file(tmp_path, rows)
    settings = DataSettings(source=str(path), eval_fraction=0.3, judge_fraction=0.3, seed=5)
    parts = split(apply_filter(load(settings, tmp_path), settings, tmp_path), settings, tmp_path / "split")
    located = {}
    for name in ("train", "eval", "judge"):
        for key in _questions(getattr(parts, name).path):
            located.setdefault(key, set()).add(name)
    assert len(located) == 30 and all(len(splits) == 1 for splits in located.values())
    assert sum(
        read_jsonl(parts.eval.path).prompt.map(lambda p: p[0]["content"].strip().lower() == "question 3").astype(int)
    ) in (0, 4)  # all four phrasings of question 3 together, or none


def test_too_few_questions_for_the_splits_is_named(tmp_path):
    path = _argilla_file(tmp_path, [{"input": "only one", "system": s} for s in ("a", "b", "c")])
    settings = DataSettings(source=str(path), judge_fraction=0.3)
    with pytest.raises(PreftuneError, match="only 1 distinct questions after filtering"):
        split(apply_filter(load(settings, tmp_path), settings, tmp_path), settings, tmp_path / "split")


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


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "latin1.jsonl",
            b'{"chosen": "a", "rejected": "b"}\n{"chosen": "caf\xe9", "rejected": "b"}\n',
            r"latin1.jsonl: line 2 is not UTF-8 text",
        ),
        ("list.jsonl", b'{"chosen": "a", "rejected": "b"}\n\n["a", "b"]\n', r"list.jsonl: line 3 is a JSON list"),
        ("broken.parquet", b"PAR1 this is not parquet", r"broken.parquet: cannot read it as parquet"),
    ],
)
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
    base = {
        "system": "",
        "input": "q",
        "chosen": "good",
        "rejected": "bad",
        "status": "unchanged",
        "chosen_score": 9.0,
        "in_gsm8k_train": False,
    }
    path = tmp_path / name
    path.write_text("".join(json.dumps(base | row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"chosen_score": "nine"}, r"row 1, column 'chosen_score': expected a number, found str 'nine'"),
        ({"in_gsm8k_train": "false"}, r"row 1, column 'in_gsm8k_train': expected true or false, found str 'false'"),
        ({"chosen": None}, r"row 1, column 'chosen': missing value \(null or NaN\)"),
        ({"input": None}, r"row 1, column 'input': missing value \(null or NaN\)"),
        ({"rejected": 3}, r"row 1, column 'rejected': expected text, found int 3"),
    ],
)
def test_wrong_types_and_missing_text_name_file_row_and_column(tmp_path, bad, message):
    path = _argilla_file(tmp_path, [{}, bad])
    with pytest.raises(PreftuneError, match=f"{path.name}, {message}"):
        load(DataSettings(source=str(path)), tmp_path)


def test_duplicates_and_identical_answers_are_dropped_and_counted(tmp_path):
    path = _argilla_file(tmp_path, [{}, {}, {"input": "q2"}, {"input": "q3", "rejected": "good"}])
    report = apply_filter(load(DataSettings(source=str(path)), tmp_path), DataSettings(), tmp_path)
    assert report.dropped["duplicate_pair"] == 1 and report.dropped["chosen_equals_rejected"] == 1
    assert report.rows == 2


def _rendered_length(tokenizer, row, side):
    return len(
        tokenizer.apply_chat_template(list(row.prompt) + list(getattr(row, side)), tokenize=True, return_dict=False)
    )


def test_overlong_pairs_are_counted_then_shortened_from_the_prompt_or_dropped(tiny_model_path, tmp_path):
    rows = [{"input": f"question {i}"} for i in range(8)] + [{"input": "long " * 300 + "so what is it?"}]
    path = _argilla_file(tmp_path, rows)
    tokenizer = load_tokenizer(tiny_model_path, ModelSettings())
    for policy, kept in (("truncate", 9), ("drop", 8)):
        settings = DataSettings(source=str(path), eval_fraction=0.5, overlong=policy, seed=3)
        report = apply_filter(load(settings, tmp_path), settings, tmp_path)
        parts = split(report, settings, tmp_path)
        formatted = format_split(parts, tokenizer, tmp_path / policy, max_length=64, overlong=policy)
        assert sum(formatted.overlong.values()) == 1 and sum(formatted.truncated_answers.values()) == 0
        assert formatted.train.rows + formatted.eval.rows == kept
        rows = [row for part in (formatted.train, formatted.eval) for row in read_jsonl(part.path).itertuples()]
        long_rows = [row for row in rows if "long" in row.prompt[-1]["content"]]
        assert len(long_rows) == (1 if policy == "truncate" else 0)
        for row in long_rows:  # the question's end and both answers survive; the text before them is cut
            assert row.prompt[-1]["content"].endswith("so what is it?")
            assert (row.chosen[0]["content"], row.rejected[0]["content"]) == ("good", "bad")
            assert _rendered_length(tokenizer, row, "chosen") <= 64


def test_fit_pair_keeps_the_answers_and_the_end_of_the_question(shared_data, smollm2_path, tmp_path):
    """Real orca pairs at 384 tokens: every pair fits, the answers stay whole where they can, and the
    question's end (nearest the answer) survives; only answers that alone exceed the limit are cut."""
    tokenizer = load_tokenizer(smollm2_path, ModelSettings())
    settings = DataSettings(source=str(shared_data / "orca_dpo_pairs.sample.jsonl"), eval_fraction=0.2)
    parts = split(apply_filter(load(settings, tmp_path), settings, tmp_path), settings, tmp_path)
    formatted = format_split(parts, tokenizer, tmp_path / "formatted", max_length=384)
    original = read_jsonl(parts.train.path)
    fitted = read_jsonl(formatted.train.path)
    assert formatted.overlong["train"] > 0
    whole = 0
    for source, row in zip(original.itertuples(), fitted.itertuples()):
        for side in ("chosen", "rejected"):
            assert _rendered_length(tokenizer, row, side) <= 384
        if row.chosen[0]["content"] == source.chosen and row.rejected[0]["content"] == source.rejected:
            whole += 1
            assert source.prompt[-1]["content"].endswith(row.prompt[-1]["content"][-20:])
    assert (
        whole == len(original) - formatted.truncated_answers["train"]
    )  # every pair not flagged kept both answers whole


def test_fit_pair_drops_the_oldest_turns_first(tiny_model_path):
    tokenizer = load_tokenizer(tiny_model_path, ModelSettings())
    prompt = [
        {"role": "user", "content": "old question " * 40},
        {"role": "assistant", "content": "old answer " * 40},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    fitted, chosen, rejected, cut = fit_pair(prompt, "Paris.", "Lyon.", tokenizer, 64)
    assert fitted == [prompt[-1]] and (chosen, rejected, cut) == ("Paris.", "Lyon.", False)


def _best_keyword_accuracy(rows: list[dict]) -> float:
    """The best accuracy any single word reaches as a rule "the answer containing it is the chosen one"."""
    words = {word for row in rows for word in (row["chosen"] + " " + row["rejected"]).lower().split()}
    best = 0.0
    for word in words:
        score = sum(
            1.0
            if (word in r["chosen"].lower().split()) > (word in r["rejected"].lower().split())
            else 0.0
            if (word in r["chosen"].lower().split()) < (word in r["rejected"].lower().split())
            else 0.5
            for r in rows
        )
        best = max(best, score / len(rows), 1 - score / len(rows))
    return best


def test_generated_sets_are_not_separable_by_a_keyword():
    helpfulness = [r for r in generate_preferences(480, seed=42) if r["status"] != "tie"]
    harmlessness = generate_safety_preferences(160, seed=42)
    assert _best_keyword_accuracy(helpfulness) < 0.6
    assert _best_keyword_accuracy(harmlessness) < 0.65
    assert len({r["chosen"] for r in harmlessness}) >= 24 and len({r["rejected"] for r in harmlessness}) >= 14


def test_instruction_set_is_not_separable_by_a_keyword_and_feeds_the_filter(tmp_path):
    """The quickstart's verifiable-instruction pairs: only the instructed property tells the answers
    apart, and the recipe's filter has ties, low scores and GSM8K-flagged rows to drop."""
    rows = generate_instruction_preferences(480, seed=42)
    assert _best_keyword_accuracy([r for r in rows if r["status"] != "tie"]) < 0.6
    assert len({r["input"] for r in rows}) >= 250 and len({r["rejected"] for r in rows}) >= 90
    settings = DataSettings(source="synthetic:instructions", synthetic_rows=480, seed=42)
    report = apply_filter(load(settings, tmp_path), settings, tmp_path)
    assert report.dropped["status_tie"] == sum(r["status"] == "tie" for r in rows) > 0
    assert report.dropped["chosen_score_below_min"] > 0 and report.dropped["in_gsm8k_train"] > 0


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
