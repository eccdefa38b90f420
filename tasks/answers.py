"""A policy's answers: the model loaded from a folder, Hub id or registry URI, and its greedy answers
to chat prompts, rendered with its chat template. Evaluation, `preftune generate` and the registered
chat model answer through this same code, so an evaluated answer is the answer a user gets."""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from tasks.base import PreftuneError
from tasks.plan import inference_placement


def shrinking(run, batch_size: int):
    """`run(batch_size)`, halving the batch after an out-of-memory error until it fits (as the training
    retry halves the micro-batch); the failed attempt's tensors are freed before the next one. accelerate
    tells the out-of-memory errors of every backend (CUDA, XPU, MPS, the CPU allocator) and clears the
    device's cache. Its `find_executable_batch_size` is not used: it runs a full `gc.collect()` before
    every call, even when the batch fits (0.7-0.9 s with this stack imported; an evaluation makes a dozen)."""
    while True:
        try:
            return run(batch_size)
        except Exception as error:
            if not should_reduce_batch_size(error):
                raise
            if batch_size == 1:
                raise PreftuneError(
                    "out of memory while evaluating at batch size 1: lower evaluation.max_length "
                    "or evaluation.max_new_tokens"
                ) from None
        batch_size //= 2
        clear_device_cache(garbage_collection=True)  # here, once the failed attempt's frames are gone


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_tokenizer(source: str):
    """A model's tokenizer alone, from the same places as `load_model`."""
    from transformers import AutoTokenizer

    try:
        if source.startswith("models:/"):
            return mlflow.transformers.load_model(source, return_type="components")["tokenizer"]
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, mlflow.exceptions.MlflowException) as error:
        raise PreftuneError(f"cannot load the tokenizer of {source!r}: {str(error).splitlines()[0]}") from None


def load_model(source: str, kind: str = "causal-lm"):
    """A model and its tokenizer from a folder, a Hub id or a `models:/` registry URI (MLflow's
    transformers flavour), on the inference device; `kind`: causal-lm (a policy) or sequence-classification
    (a judge). Any failure to load is one line naming the source."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    device, dtype = inference_placement()
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    try:
        with suppress_seqcls_warning():  # a judge that is an adapter over a causal LM: its head comes with it
            if source.startswith("models:/"):
                components = mlflow.transformers.load_model(source, return_type="components")
                model, tokenizer = components["model"], components["tokenizer"]
            else:
                model = auto.from_pretrained(source, dtype=dtype, use_safetensors=True)
                tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, mlflow.exceptions.MlflowException) as error:
        what = "model" if kind == "causal-lm" else "reward model"
        raise PreftuneError(f"cannot load the {what} {source!r}: {str(error).splitlines()[0]}") from None
    return model.to(device, dtype).eval(), tokenizer


def load_policy(source: str):
    """A causal LM and its tokenizer, padded on the left for batched generation."""
    model, tokenizer = load_model(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@torch.inference_mode()
def generate(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 8
) -> tuple[list[str], np.ndarray]:
    """Greedy responses, batched, and their lengths in tokens (up to the first end-of-turn)."""
    responses, lengths = [], []
    for batch in batches(prompts, batch_size):
        texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in batch]
        encoded = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(model.device)
        output = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        ended = (new_tokens == tokenizer.eos_token_id).int()
        lengths.extend(torch.where(ended.any(1), ended.argmax(1), new_tokens.shape[1]).cpu().tolist())
        responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [r.strip() for r in responses], np.array(lengths)
