"""Where preference pairs come from, and how they are filtered and split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import MayHoldCredentials, StrictModel
from tasks.schemas import SCHEMAS

Format = Literal[("auto", *SCHEMAS)]


class DataSettings(StrictModel):
    """Where preference pairs come from and how they are filtered and split. The split is by question,
    so no question is in two of the policy's train, held-out and judges' splits."""

    source: MayHoldCredentials = Field(
        "synthetic",
        description="A generated set (synthetic, synthetic:instructions, "
        "synthetic:harmlessness), a local jsonl/json/parquet/csv file, "
        "or a Hub dataset id.",
    )
    split: str = Field("train", description="The dataset split to read (Hub datasets).")
    data_dir: MayHoldCredentials | None = Field(
        None, description="A Hub dataset's subset folder, e.g. harmless-base of Anthropic/hh-rlhf."
    )
    format: Format = Field("auto", description="The rows' schema (tasks/schemas.py); auto: detected from the columns.")
    synthetic_rows: int = Field(480, gt=0, description="Pairs a generated source makes.")
    max_rows: int | None = Field(None, gt=0, description="Read only the first this-many rows; empty: all.")
    # The data's authors drop ties; the recipe's literal note keeps only ties.
    status_rule: Literal["drop_ties", "only_ties", "keep_all"] = Field(
        "drop_ties",
        description=(
            "The recipe's filter on a `status` column: drop_ties (the data's authors), only_ties (the recipe's "
            "literal note) or keep_all."
        ),
    )
    min_chosen_score: float | None = Field(
        8.0, description="Drop pairs whose `chosen_score` is below this; empty: no score filter."
    )
    drop_in_gsm8k_train: bool = Field(
        True, description="Drop pairs flagged `in_gsm8k_train` (the recipe's contamination filter)."
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of questions held out for evaluation.")
    # The policy never sees the judges' share, so a judge's verdict on the policy is not a verdict on its
    # own training pairs.
    judge_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=("A further share of questions for the judges trained on this data, which the policy never sees."),
    )
    # Nothing is dropped silently by a trainer: overlong pairs are counted first.
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description=(
            "Pairs longer than a stage's max_length: truncate (the prompt loses its oldest turns and text first, "
            "answers stay whole unless alone too long) or drop."
        ),
    )
    seed: int = Field(42, description="Seed of the split and of generated data.")
