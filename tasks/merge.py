"""Merge LoRA adapters into full-precision base weights and save a plain model folder.

Adapters trained on a 4-bit base are merged into the unquantized weights: merging into 4-bit ones
adds rounding error (~0.6 in logits), so the base is always reloaded in fp32 here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from tasks.base import Workspace, retry_unless_user_error
from tasks.models import _atomic_save

HEADS = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}


def merge_into_base(base_path: str, adapter_dirs: list[str], output_dir: Path,
                    head: Literal["causal-lm", "sequence-classification"] = "causal-lm") -> str:
    """base <- adapter 1 <- adapter 2 ..., each merged in turn (SFT then DPO in the recipe)."""
    import transformers

    if (output_dir / "config.json").exists():
        return str(output_dir)
    model_class = getattr(transformers, HEADS[head])
    extra = {"num_labels": 1} if head == "sequence-classification" else {}
    model = model_class.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True, **extra)
    for adapter in adapter_dirs:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = transformers.AutoTokenizer.from_pretrained(adapter_dirs[-1])
    if head == "sequence-classification":
        model.config.pad_token_id = tokenizer.pad_token_id

    def save(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    _atomic_save(output_dir, save)
    return str(output_dir)


@task(name="merge-adapters", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error,
      tags=["model"], cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def merge_adapters(base_path: str, adapter_dirs: list[str], workspace: Workspace) -> str:
    return merge_into_base(base_path, adapter_dirs, workspace.stage("merge") / "model")
