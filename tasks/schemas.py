"""Source schemas of preference data: one row each (how to detect it, the columns it needs, how a row
becomes a normalised pair). A new schema is one entry in `SCHEMAS`.

A normalised pair has the system prompt, the prompt (chat messages without system), the chosen and
rejected answers, and the labels the recipe's filter reads (status, chosen_score, in_gsm8k_train).
Every bad value is reported with its file, row and column.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from tasks.base import PreftuneError

NORMALIZED_COLUMNS = [
    "system",
    "prompt",
    "chosen",
    "rejected",
    "status",
    "chosen_score",
    "in_gsm8k_train",
    "prompt_mismatch",
]
# IFEval's columns: a row's verifiable instructions, which evaluation checks with lm_eval's checkers. Optional in
# every schema; kept through filtering, splitting and formatting.
INSTRUCTION_COLUMNS = ["instruction_id_list", "kwargs"]
TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_transcript(text: str) -> list[dict[str, str]]:
    """hh-rlhf's "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript as chat messages."""
    parts = TURN.split(text)
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _text(value, where: str) -> str:
    if _missing(value):
        raise PreftuneError(f"{where}: missing value (null or NaN) where text is expected")
    if not isinstance(value, str):
        raise PreftuneError(f"{where}: expected text, found {type(value).__name__} {value!r:.60}")
    return value


def _score(value, where: str) -> float | None:
    if _missing(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PreftuneError(f"{where}: expected a number, found {type(value).__name__} {value!r:.40}")
    return float(value)


def _flag(value, where: str) -> bool | None:
    if _missing(value):
        return None
    if not isinstance(value, bool):
        raise PreftuneError(f"{where}: expected true or false, found {type(value).__name__} {value!r:.40}")
    return value


def _last_assistant(messages, where: str) -> str:
    if isinstance(messages, str):
        return messages
    if isinstance(messages, (dict, bytes)) or not hasattr(messages, "__iter__"):
        _text(messages, where)  # raises, naming what was found
    messages = list(messages)
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise PreftuneError(f"{where}: expected a list ending with an assistant message")
    return _text(messages[-1].get("content"), where)


def _column(row: dict, name: str, where: str, read=_text):
    return read(row.get(name), f"{where}, column '{name}'")


def _argilla(row: dict, where: str) -> dict:
    question_column = "input" if "input" in row else "question"
    status = row.get("status")
    return {
        "system": row.get("system") or "",
        "prompt": [{"role": "user", "content": _column(row, question_column, where)}],
        "chosen": _column(row, "chosen", where),
        "rejected": _column(row, "rejected", where),
        "status": None if _missing(status) else _column(row, "status", where),
        "chosen_score": _column(row, "chosen_score", where, _score),
        "in_gsm8k_train": _column(row, "in_gsm8k_train", where, _flag),
    }


def _openai_dpo(row: dict, where: str) -> dict:
    messages = list(row["input"]["messages"])
    return {
        "system": "\n".join(m["content"] for m in messages if m["role"] == "system"),
        "prompt": [dict(m) for m in messages if m["role"] != "system"],
        "chosen": _column(row, "preferred_output", where, _last_assistant),
        "rejected": _column(row, "non_preferred_output", where, _last_assistant),
    }


def _hh_rlhf(row: dict, where: str) -> dict:
    chosen = parse_transcript(_column(row, "chosen", where))
    rejected = parse_transcript(_column(row, "rejected", where))
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        raise PreftuneError(f"{where}: transcript does not end with an Assistant turn")
    return {
        "prompt": chosen[:-1],
        "chosen": chosen[-1]["content"],
        "rejected": rejected[-1]["content"],
        "prompt_mismatch": chosen[:-1] != rejected[:-1],
    }  # a known hh-rlhf quirk


def _pairs(row: dict, where: str) -> dict:
    prompt = row["prompt"]
    return {
        "prompt": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt],
        "chosen": _column(row, "chosen", where, _last_assistant),
        "rejected": _column(row, "rejected", where, _last_assistant),
    }


@dataclass(frozen=True)
class Schema:
    description: str  # its columns, as an error message lists them
    required: frozenset[str]  # every one must be present
    one_of: frozenset[str]  # at least one of these too (empty: no such rule)
    exact: bool  # detected only when the columns are exactly `required`
    row: Callable[[dict, str], dict]  # a source row (and where it is) -> the normalised pair's fields

    def matches(self, columns: set[str]) -> bool:
        present = self.required <= columns and (not self.one_of or bool(self.one_of & columns))
        return present and (not self.exact or columns == self.required)

    def missing(self, columns: set[str]) -> list[str]:
        absent = set(self.required - columns)
        if self.one_of and not self.one_of & columns:
            absent.add(sorted(self.one_of)[0])
        return sorted(absent)


def _schema(description: str, required: set[str], row, one_of: set[str] = frozenset(), exact: bool = False) -> Schema:
    return Schema(description, frozenset(required), frozenset(one_of), exact, row)


# Detection tries the rows in order: the most specific first.
SCHEMAS: dict[str, Schema] = {
    "openai_dpo": _schema(
        "input.messages, preferred_output, non_preferred_output",
        {"input", "preferred_output", "non_preferred_output"},
        _openai_dpo,
    ),
    "argilla": _schema(
        "system, input, chosen, rejected[, status, chosen_score, in_gsm8k_train]",
        {"chosen", "rejected"},
        _argilla,
        one_of={"input", "question"},
    ),
    "pairs": _schema("prompt, chosen, rejected", {"prompt", "chosen", "rejected"}, _pairs),
    "hh_rlhf": _schema("chosen, rejected transcripts", {"chosen", "rejected"}, _hh_rlhf, exact=True),
}


def detect_schema(columns: set[str]) -> str:
    for name, schema in SCHEMAS.items():
        if schema.matches(columns):
            return name
    expected = "; ".join(f"{name} ({schema.description})" for name, schema in SCHEMAS.items())
    raise PreftuneError(f"unrecognised columns {sorted(columns)}; expected one of: {expected}")


def _listed(value) -> list | None:
    """A JSON list, or the array a parquet or Hub table holds in its place."""
    if hasattr(value, "tolist") and not isinstance(value, (str, dict)):
        value = value.tolist()
    return value if isinstance(value, list) else None


def instructions_of(row: dict, where: str, known: dict) -> dict:
    """IFEval's `instruction_id_list` (ids of lm_eval's registry) and `kwargs` (one mapping each; the keys a
    Hub table holds unset, as None, dropped), checked and named by `where` (file and row)."""
    ids, kwargs = _listed(row.get("instruction_id_list")), _listed(row.get("kwargs"))
    if ids is None or not all(isinstance(name, str) for name in ids):
        raise PreftuneError(
            f"{where}, column 'instruction_id_list': expected a list of instruction ids, "
            f"found {row.get('instruction_id_list')!r:.60}"
        )
    if kwargs is None or len(kwargs) != len(ids) or not all(isinstance(values, dict) for values in kwargs):
        raise PreftuneError(
            f"{where}, column 'kwargs': expected one mapping per instruction ({len(ids)}), "
            f"found {row.get('kwargs')!r:.60}"
        )
    if unknown := [name for name in ids if name not in known]:
        raise PreftuneError(f"{where}, column 'instruction_id_list': unknown IFEval instruction {unknown[0]!r}")
    return {
        "instruction_id_list": ids,
        "kwargs": [{name: value for name, value in values.items() if value is not None} for values in kwargs],
    }


def normalize(table: pd.DataFrame, fmt: str, source: str) -> pd.DataFrame:
    """A source table in schema `fmt` ("auto": detected) -> normalised pairs, with the schema's name."""
    columns = set(table.columns)
    instructed = columns & set(INSTRUCTION_COLUMNS)
    if instructed and instructed != set(INSTRUCTION_COLUMNS):
        raise PreftuneError(
            f"{source}: instruction columns come in pairs: found {sorted(instructed)}, expected {INSTRUCTION_COLUMNS}"
        )
    columns -= set(INSTRUCTION_COLUMNS)
    fmt = detect_schema(columns) if fmt == "auto" else fmt
    schema = SCHEMAS[fmt]
    if missing := schema.missing(columns):
        raise PreftuneError(f"{source}: missing columns {missing} for format '{fmt}'; found {sorted(columns)}")
    empty = {"system": "", "status": None, "chosen_score": None, "in_gsm8k_train": None, "prompt_mismatch": False}
    rows = [empty | schema.row(row, f"{source}, row {index}") for index, row in enumerate(table.to_dict("records"))]
    frame = pd.DataFrame(rows, columns=NORMALIZED_COLUMNS)
    if instructed:
        from tasks.instructions import registry

        known = registry()
        instructions = [
            instructions_of(row, f"{source}, row {index}", known) for index, row in enumerate(table.to_dict("records"))
        ]
        frame = frame.assign(**{name: [row[name] for row in instructions] for name in INSTRUCTION_COLUMNS})
    return frame.assign(_format=fmt)
