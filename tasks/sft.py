"""Optional SFT stage: TRL's SFTTrainer with LoRA on its own chat data (as the recipe does), on the
chosen responses of the preference pairs, or an existing SFT adapter merged as it is.

Its adapter is merged into the full-precision base, and DPO trains on that merged model, so the DPO
reference (the adapter switched off) is the SFT model, as in the recipe.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from pydantic import BaseModel

from tasks import stages
from tasks.base import PreftuneError, Workspace, retry_unless_user_error
from tasks.caching import STAGE_CACHE, stage_folder
from tasks.data import SplitData, read_jsonl, read_table, write_jsonl
from tasks.distributed import DistributedSettings
from tasks.merge import merge_into_base
from tasks.models import ResolvedModel
from tasks.plan import TrainingPlan, default_plan
from tasks.run_context import RunContext
from tasks.settings.training import ChatDataSettings, SFTSettings
from tasks.trainer import TrainerSpec
from tasks.training import FitResult, fit, training_task


class SFTResult(BaseModel):
    adapter_dir: str
    model_dir: str  # base with the SFT adapter merged: DPO's starting point and reference
    fit: FitResult | None = None  # what training left (none for an adapter trained elsewhere)


def _check_conversation(messages, where: str) -> list[dict]:
    if isinstance(messages, str) or not hasattr(messages, "__iter__"):
        raise PreftuneError(f"{where}: expected a list of chat messages, found {type(messages).__name__}")
    turns = [dict(m) if isinstance(m, dict) else m for m in messages]
    if not turns or not all(isinstance(t, dict) and isinstance(t.get("content"), str) and t.get("role") for t in turns):
        raise PreftuneError(f"{where}: every message needs a role and a text content")
    if not any(t["role"] == "assistant" for t in turns):
        raise PreftuneError(f"{where}: no assistant turn to learn from")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def load_chat(settings: ChatDataSettings, data_dir: Path) -> SplitData:
    """The conversations, checked row by row, shuffled with the seed, cut to `rows` (+ `eval_rows`)."""
    from datasets import Dataset

    table = read_table(settings.source, settings.split)
    if settings.column not in table.columns:
        raise PreftuneError(f"{settings.source}: no column {settings.column!r} (found {sorted(table.columns)})")
    table = pd.DataFrame(
        {
            "messages": [
                _check_conversation(m, f"{settings.source}, row {i}, column '{settings.column}'")
                for i, m in enumerate(table[settings.column])
            ]
        }
    )
    wanted = (settings.rows or len(table) - settings.eval_rows) + settings.eval_rows
    if wanted > len(table):
        raise PreftuneError(
            f"{settings.source}: {len(table)} conversations, fewer than the {wanted} asked for "
            "(sft.chat_data.rows + eval_rows)"
        )
    shuffled = Dataset.from_pandas(table).shuffle(seed=settings.seed).select(range(wanted)).to_pandas()
    train_rows = wanted - settings.eval_rows
    return SplitData(
        train=write_jsonl(shuffled.iloc[:train_rows], data_dir / "train.jsonl"),
        eval=write_jsonl(shuffled.iloc[train_rows:], data_dir / "eval.jsonl"),
    )


@task(
    name="load-chat-data",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless_user_error,
    cache_policy=STAGE_CACHE,
    persist_result=True,
)
def prepare_chat_data(settings: ChatDataSettings, workspace: Workspace) -> SplitData:
    return load_chat(settings, stage_folder(workspace, stages.data_for(stages.SFT)))


def to_prompt_completion(pairs_path: str, out_path: Path) -> str:
    """Conversational preference pairs -> TRL prompt/completion rows on the chosen answer."""
    frame = read_jsonl(pairs_path)
    return write_jsonl(frame[["prompt", "chosen"]].rename(columns={"chosen": "completion"}), out_path).path


def sft_spec(settings: SFTSettings, model: ResolvedModel, train_path: str, eval_path: str) -> TrainerSpec:
    """TRL's SFTTrainer on conversations or prompt/completion rows."""
    return TrainerSpec.of(
        settings,
        stage=stages.SFT,
        trainer="trl.SFTTrainer",
        config=stages.SFT_CONFIG,
        model=model,
        train_data=train_path,
        eval_data=eval_path,
    )


def train_sft_adapter(
    settings: SFTSettings,
    model: ResolvedModel,
    splits: SplitData,
    stage_dir: Path,
    *,
    plan: TrainingPlan | None = None,
    distributed: DistributedSettings | None = None,
) -> SFTResult:
    """Train the SFT adapter in `stage_dir` (or take the given one) and merge it into the base."""
    if settings.adapter_path:
        if not (Path(settings.adapter_path) / "adapter_config.json").is_file():
            raise PreftuneError(f"sft.adapter_path {settings.adapter_path} has no adapter_config.json")
        merged = merge_into_base(model.path, [settings.adapter_path], stage_dir / "model")
        return SFTResult(adapter_dir=settings.adapter_path, model_dir=merged)
    if settings.chat_data:  # conversations: TRL's conversational format as they are
        train_path, eval_path = splits.train.path, splits.eval.path
    else:
        train_path = to_prompt_completion(splits.train.path, stage_dir / "train.jsonl")
        eval_path = to_prompt_completion(splits.eval.path, stage_dir / "eval.jsonl")
    plan = plan or default_plan(stages.SFT, "sft", settings, model, splits.train.rows, distributed)
    fitted = fit(sft_spec(settings, model, train_path, eval_path), plan, stage_dir, distributed)
    merged = merge_into_base(model.path, [fitted.adapter_dir], stage_dir / "model")
    return SFTResult(adapter_dir=fitted.adapter_dir, model_dir=merged, fit=fitted)


@training_task("train-sft")
def train_sft(
    *, settings: SFTSettings, model: ResolvedModel, splits: SplitData, plan: TrainingPlan, run: RunContext
) -> SFTResult:
    return train_sft_adapter(
        settings, model, splits, stage_folder(run.workspace, stages.SFT), plan=plan, distributed=run.distributed
    )
