"""Optional SFT stage: TRL's SFTTrainer with LoRA on its own chat data (as the recipe does), on the
chosen responses of the preference pairs, or an existing SFT adapter merged as it is.

Its adapter is merged into the full-precision base, and DPO trains on that merged model, so the DPO
reference (the adapter switched off) is the SFT model, as in the recipe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
from prefect import task
from pydantic import BaseModel, Field, model_validator

from tasks import stages
from tasks.base import MayHoldCredentials, PreftuneError, StrictModel, Workspace, retry_unless_user_error
from tasks.caching import DATA_CACHE, code_fingerprint
from tasks.data import DataSettings, SplitData, read_jsonl, read_table, write_jsonl
from tasks.distributed import DistributedSettings
from tasks.merge import merge_into_base
from tasks.models import ResolvedModel
from tasks.plan import TrainingPlan, default_plan
from tasks.tracking import stage_run
from tasks.training import TrainerSettings, fit, load_pairs, training_task


class ChatDataSettings(StrictModel):
    """Conversations for SFT: a column of chat messages (role/content turns ending with the assistant),
    which TRL's SFTTrainer renders with the model's chat template (e.g. ultrachat_200k's `messages`)."""

    source: MayHoldCredentials = Field(description="A Hub dataset id or a local jsonl/json/parquet file.")
    split: str = Field("train", description="The dataset split to read (Hub datasets).")
    column: str = Field("messages", description="The column holding each conversation's role/content turns.")
    rows: int | None = Field(None, gt=0, description="Training conversations: a seeded shuffle's first rows "
                                                     "(Dataset.shuffle(seed).select); empty: all but eval_rows.")
    seed: int = Field(42, description="Seed of the shuffle that picks the rows.")
    eval_rows: int = Field(16, gt=0, description="Conversations held out after the training rows.")


class SFTSettings(TrainerSettings):
    """Supervised fine-tuning before the preference method, with TRL's `SFTTrainer` (other keys: `SFTConfig`'s
    options); the policy then starts from, and is referenced to, the merged SFT model."""

    own_fields = TrainerSettings.own_fields | {"enabled", "adapter_path", "data", "chat_data"}
    trl_config = "trl.SFTConfig"

    enabled: bool = Field(False, description="Run the SFT stage (off: the policy starts from the base model).")
    adapter_path: str | None = Field(None, description="An SFT adapter trained elsewhere, merged instead of "
                                                        "training one (with enabled on).")
    chat_data: ChatDataSettings | None = Field(None, description="Its own conversations (the recipe's ultrachat "
                                                                 "rows); set this or data, not both.")
    data: DataSettings | None = Field(None, description="Without chat_data: train on the chosen answers of these "
                                                        "pairs; empty: the policy's.")
    learning_rate: float = Field(2e-4, description="Peak learning rate of the schedule.")

    @model_validator(mode="after")
    def _one_source(self) -> "SFTSettings":
        if self.chat_data and self.data:
            raise ValueError("set sft.chat_data (conversations) or sft.data (preference pairs), not both")
        return self


class SFTResult(BaseModel):
    adapter_dir: str
    model_dir: str  # base with the SFT adapter merged: DPO's starting point and reference
    metrics: dict[str, float]
    mlflow_run_id: str | None


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
    table = pd.DataFrame({"messages": [_check_conversation(m, f"{settings.source}, row {i}, column '{settings.column}'")
                                       for i, m in enumerate(table[settings.column])]})
    wanted = (settings.rows or len(table) - settings.eval_rows) + settings.eval_rows
    if wanted > len(table):
        raise PreftuneError(f"{settings.source}: {len(table)} conversations, fewer than the {wanted} asked for "
                            "(sft.chat_data.rows + eval_rows)")
    shuffled = Dataset.from_pandas(table).shuffle(seed=settings.seed).select(range(wanted)).to_pandas()
    train_rows = wanted - settings.eval_rows
    return SplitData(train=write_jsonl(shuffled.iloc[:train_rows], data_dir / "train.jsonl"),
                     eval=write_jsonl(shuffled.iloc[train_rows:], data_dir / "eval.jsonl"))


@task(name="load-chat-data", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error,
      cache_policy=DATA_CACHE, persist_result=True)
def prepare_chat_data(settings: ChatDataSettings, workspace: Workspace) -> SplitData:
    return load_chat(settings, workspace.stage(stages.data_for(stages.SFT), settings))


def to_prompt_completion(pairs_path: str, out_path: Path) -> str:
    """Conversational preference pairs -> TRL prompt/completion rows on the chosen answer."""
    frame = read_jsonl(pairs_path)
    return write_jsonl(frame[["prompt", "chosen"]].rename(columns={"chosen": "completion"}), out_path).path


def sft_trainer(settings: SFTSettings, model: ResolvedModel, train_path: str, eval_path: str,
                stage_dir: Path) -> Callable[[TrainingPlan], object]:
    """TRL's SFTTrainer for a plan (built in each process that trains)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = model.tokenizer()

    def make_trainer(plan: TrainingPlan) -> SFTTrainer:
        args = SFTConfig(**settings.trainer_args(stage_dir / "checkpoints", plan, stages.SFT))  # before the model (ZeRO-3)
        network = AutoModelForCausalLM.from_pretrained(model.path, **plan.load_kwargs(model.settings))
        return SFTTrainer(
            model=network,
            args=args,
            train_dataset=load_pairs(train_path),
            eval_dataset=load_pairs(eval_path),
            processing_class=tokenizer,
            peft_config=settings.lora.peft_config("CAUSAL_LM", network.config.num_hidden_layers),
        )

    return make_trainer


def train_sft_adapter(settings: SFTSettings, model: ResolvedModel, splits: SplitData, stage_dir: Path,
                      parent_run_id: str | None = None, plan: TrainingPlan | None = None,
                      distributed: DistributedSettings | None = None) -> SFTResult:
    if settings.adapter_path:
        if not (Path(settings.adapter_path) / "adapter_config.json").is_file():
            raise PreftuneError(f"sft.adapter_path {settings.adapter_path} has no adapter_config.json")
        merged = merge_into_base(model.path, [settings.adapter_path], stage_dir / "model")
        return SFTResult(adapter_dir=settings.adapter_path, model_dir=merged, metrics={}, mlflow_run_id=None)

    plan = plan or default_plan(stages.SFT, "sft", settings, model, splits.train.rows, distributed)
    if settings.chat_data:  # conversations: TRL's conversational format as they are
        train_path, eval_path = splits.train.path, splits.eval.path
    else:
        train_path = to_prompt_completion(splits.train.path, stage_dir / "train.jsonl")
        eval_path = to_prompt_completion(splits.eval.path, stage_dir / "eval.jsonl")

    with stage_run(stages.SFT, parent_run_id) as run:
        fitted = fit(sft_trainer, settings, plan, stage_dir, distributed, model=model, train_path=train_path,
                           eval_path=eval_path)
        merged = merge_into_base(model.path, [fitted.adapter_dir], stage_dir / "model")
        return SFTResult(adapter_dir=fitted.adapter_dir, model_dir=merged, metrics=fitted.metrics,
                         mlflow_run_id=run.info.run_id)


@training_task("train-sft")
def train_sft(settings: SFTSettings, model: ResolvedModel, splits: SplitData, plan: TrainingPlan,
              workspace: Workspace, parent_run_id: str | None = None,
              distributed: DistributedSettings | None = None) -> SFTResult:
    stage_dir = workspace.stage(stages.SFT, settings, model, splits, plan.result_key(),
                                code_fingerprint(__name__))
    return train_sft_adapter(settings, model, splits, stage_dir, parent_run_id, plan=plan, distributed=distributed)
