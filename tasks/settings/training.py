"""The training stages' settings: what every TRL trainer shares, and each stage's own.

Any key a class does not declare is an option of the stage's TRL config under TRL's own name; it is
checked against that class where the trainer is specified (tasks/trainer.py), not here, so building
the settings needs no TRL.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.base import MayHoldCredentials, StrictModel
from tasks.settings.data import DataSettings
from tasks.settings.models import LoraSettings, ModelSettings


class TrainerSettings(BaseModel):
    """A stage's TRL `*Config`, under TRL's own names: the fields below are the ones every stage uses
    (with our defaults); any other key is passed to the TRL config as it is, after a check that the
    class has such a field, so a TRL option is one YAML key away and a typo still fails by name. The
    training plan (tasks/plan.py) decides precision, micro-batch x accumulation, checkpointing and optimizer."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    max_steps: int = Field(40, gt=0, description="Optimizer steps the stage trains for.")
    per_device_train_batch_size: int = Field(
        2,
        gt=0,
        description=(
            "Examples per micro-batch; times gradient_accumulation_steps it is the effective batch the plan keeps."
        ),
    )
    per_device_eval_batch_size: int = Field(8, gt=0, description="Examples per batch in the trainer's held-out pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of the schedule.")
    lr_scheduler_type: str = Field("cosine", description="transformers' learning-rate schedule (cosine, linear, ...).")
    warmup_steps: float = Field(
        0.1, ge=0, description=("Warm-up steps; below 1, a fraction of max_steps (TRL 1.x dropped warmup_ratio).")
    )
    optim: str = Field(
        "adamw_torch",
        description="transformers' optimizer name (the auto plan may pick an "
        "equivalent implementation for the device).",
    )
    max_length: int = Field(
        256,
        gt=8,
        description="Tokens per sequence, prompt and answer together; longer rows are shortened by the data stage.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass (the auto plan turns it on only when memory is short).",
    )
    logging_steps: int = Field(5, gt=0, description="Steps between training-curve points logged to MLflow.")
    save_steps: int = Field(20, gt=0, description="Steps between checkpoints a killed run resumes from.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk while the stage trains.")
    seed: int = Field(42, description="Seed for the new weights (LoRA, reward head) and the data order.")
    evaluate_after_training: bool = Field(
        False,
        description=(
            "Run the trainer's own held-out pass after training (off: the evaluate stage measures the same pairs, "
            "with intervals, and on a CPU this pass can cost as much as training)."
        ),
    )
    keep_checkpoints: bool = Field(
        False,
        description=(
            "Keep the checkpoints once the stage is done (off: the adapter and history are all later stages need)."
        ),
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The LoRA adapter the stage trains.")


class PolicySettings(TrainerSettings):
    """Our common trainer settings; any other key is an option of the method's TRL config under TRL's
    name (`beta`, `loss_type`, `num_generations`, ...), checked against that class. Length control
    where TRL has one: DPO's `ld_alpha` (down-weights the log-probabilities of the longer answer's
    extra tokens), SimPO's length-normalised reward, and for online methods `overlong_penalty_tokens`."""

    overlong_penalty_tokens: int | None = Field(
        None,
        gt=0,
        description="Online methods (rloo, grpo): penalise completions that run into the last this-many "
        "tokens before max_completion_length (TRL's soft overlong punishment, DAPO).",
    )


class RewardSettings(TrainerSettings):
    """One reward aspect's judge: trained with TRL's `RewardTrainer` (other keys: `RewardConfig`'s options),
    or given as an existing model."""

    learning_rate: float = Field(1e-4, description="Peak learning rate of the schedule.")
    weight: float = Field(1.0, gt=0, description="This aspect's share of the combined score.")
    data: DataSettings | None = Field(
        None,
        description=(
            "This aspect's own preference pairs; empty: the judges' share of the pipeline's data (questions the "
            "policy never sees)."
        ),
    )
    model: ModelSettings | None = Field(
        None, description="The judge's backbone; empty: the policy's base model (a small encoder also works)."
    )
    judge: MayHoldCredentials | None = Field(
        None,
        description="A sequence-classification model to judge with instead of "
        "training one: folder, Hub id or models:/ URI.",
    )


class ChatDataSettings(StrictModel):
    """Conversations for SFT: a column of chat messages (role/content turns ending with the assistant),
    which TRL's SFTTrainer renders with the model's chat template (e.g. ultrachat_200k's `messages`)."""

    source: MayHoldCredentials = Field(description="A Hub dataset id or a local jsonl/json/parquet file.")
    split: str = Field("train", description="The dataset split to read (Hub datasets).")
    column: str = Field("messages", description="The column holding each conversation's role/content turns.")
    rows: int | None = Field(
        None,
        gt=0,
        description="Training conversations: a seeded shuffle's first rows "
        "(Dataset.shuffle(seed).select); empty: all but eval_rows.",
    )
    seed: int = Field(42, description="Seed of the shuffle that picks the rows.")
    eval_rows: int = Field(16, gt=0, description="Conversations held out after the training rows.")


class SFTSettings(TrainerSettings):
    """Supervised fine-tuning before the preference method, with TRL's `SFTTrainer` (other keys: `SFTConfig`'s
    options); the policy then starts from, and is referenced to, the merged SFT model."""

    enabled: bool = Field(False, description="Run the SFT stage (off: the policy starts from the base model).")
    adapter_path: str | None = Field(
        None, description="An SFT adapter trained elsewhere, merged instead of training one (with enabled on)."
    )
    chat_data: ChatDataSettings | None = Field(
        None, description="Its own conversations (the recipe's ultrachat rows); set this or data, not both."
    )
    data: DataSettings | None = Field(
        None, description="Without chat_data: train on the chosen answers of these pairs; empty: the policy's."
    )
    learning_rate: float = Field(2e-4, description="Peak learning rate of the schedule.")

    @model_validator(mode="after")
    def _one_source(self) -> SFTSettings:
        if self.chat_data and self.data:
            raise ValueError("set sft.chat_data (conversations) or sft.data (preference pairs), not both")
        return self
