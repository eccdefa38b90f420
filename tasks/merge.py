"""Merge LoRA adapters into full-precision base weights, save a plain model, and check the result.

Adapters trained on a 4-bit base are merged into the unquantized weights: merging into 4-bit ones
adds rounding error (bench/RESULTS.md: "Measured choices"), so the base is always reloaded in fp32 here.
The check compares the merged model's logits with the base running the same adapters unmerged, on held-out prompts.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import torch
from peft import PeftModel
from prefect import task
from pydantic import BaseModel

from tasks.base import PreftuneError, Workspace, retry_unless_user_error
from tasks.caching import STAGE_CACHE, stage_folder
from tasks.data import read_jsonl
from tasks.plan import inference_placement
from tasks.settings.evaluation import MergeSettings
from tasks.tracking import CHAT, hf_folder, save_mlflow_model


class MergeResult(BaseModel):
    model_dir: str
    max_logit_difference: float
    prompts_checked: int
    device: str = "cpu"  # where the check ran


# Building a model patches process-wide state (empty-weight initialisation), so stages that finish at the
# same time (parallel reward aspects) load and merge one at a time; their training runs in processes of its own.
MERGING = threading.Lock()


class MergeMismatchError(PreftuneError):
    """The merged weights do not reproduce base+adapters: never register such a model."""


def _load_base(base_path: str):
    from transformers import AutoModelForCausalLM

    device, _ = inference_placement()
    return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True).to(device)


def merge_into_base(base_path: str, adapter_dirs: list[str], output_dir: Path, answer_tokens: int = 128) -> str:
    """base <- adapter 1 <- adapter 2 ..., each merged in turn (SFT then DPO in the recipe). Written once,
    as an MLflow chat model (`output_dir`) whose `model/` folder is a plain Hugging Face model: later stages
    load that folder, and the registry points at the MLflow model instead of copying it. Served, it answers
    greedily with up to `answer_tokens` tokens unless a request says otherwise (the evaluation's settings)."""
    from transformers import AutoTokenizer

    folder = hf_folder(output_dir)
    if (folder / "config.json").exists():
        return str(folder)
    with MERGING:
        model = _load_base(base_path)
        for adapter in adapter_dirs:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    save_mlflow_model(
        model.cpu(),
        AutoTokenizer.from_pretrained(adapter_dirs[-1]),
        CHAT,
        output_dir,
        model_config={"max_new_tokens": answer_tokens, "do_sample": False},
    )
    return str(folder)


@torch.inference_mode()
def max_logit_difference(merged_dir: str, base_path: str, adapter_dirs: list[str], prompts: list[list[dict]]) -> float:
    """Largest |logit| gap between the merged model and the base with all adapters active, unmerged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    device, _ = inference_placement()
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    stacked = PeftModel.from_pretrained(_load_base(base_path), adapter_dirs[0], adapter_name="a0")
    for index, adapter in enumerate(adapter_dirs[1:], start=1):
        stacked.load_adapter(adapter, adapter_name=f"a{index}")
    stacked.base_model.set_adapter([f"a{i}" for i in range(len(adapter_dirs))])
    expected = stacked.eval()(**inputs).logits
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, use_safetensors=True).to(device)
    merged = merged.eval()(**inputs).logits
    mask = inputs["attention_mask"].bool()
    return float((merged - expected).abs()[mask].max())


def merge_and_check(
    base_path: str,
    adapter_dirs: list[str],
    eval_path: str,
    settings: MergeSettings,
    output_dir: Path,
    answer_tokens: int = 128,
) -> MergeResult:
    """Merge into `output_dir` (an MLflow chat model), then check its logits against base+adapters."""
    model_dir = merge_into_base(base_path, adapter_dirs, output_dir, answer_tokens)
    prompts = [list(p) for p in read_jsonl(eval_path).prompt[: settings.check_prompts]]
    difference = max_logit_difference(model_dir, base_path, adapter_dirs, prompts)
    if difference > settings.tolerance:
        rejected = output_dir.with_name(output_dir.name + ".rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        output_dir.rename(rejected)  # kept for inspection; a re-run merges afresh
        raise MergeMismatchError(
            f"merged model {rejected} differs from base+adapters by {difference:.2e} in logits "
            f"(tolerance {settings.tolerance:.0e}) on {len(prompts)} held-out prompts"
        )
    return MergeResult(
        model_dir=model_dir,
        max_logit_difference=difference,
        prompts_checked=len(prompts),
        device=str(inference_placement()[0]),
    )


@task(
    name="merge-adapters",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_user_error,
    cache_policy=STAGE_CACHE,
    persist_result=True,
)
def merge_adapters(
    base_path: str,
    adapter_dirs: list[str],
    eval_path: str,
    settings: MergeSettings,
    workspace: Workspace,
    answer_tokens: int = 128,
) -> MergeResult:
    return merge_and_check(
        base_path, adapter_dirs, eval_path, settings, stage_folder(workspace, "merge") / "model", answer_tokens
    )
