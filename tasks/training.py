"""Settings shared by the TRL trainers, and the checkpoint plumbing that makes training resumable."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field
from transformers.trainer_utils import get_last_checkpoint

from tasks.base import StrictModel
from tasks.models import LoraSettings, ModelSettings, mixed_precision


class TrainerSettings(StrictModel):
    """The subset of TRL's `*Config` a profile sets; precision follows the machine (see models.py)."""

    max_steps: int = Field(40, gt=0)
    per_device_train_batch_size: int = Field(2, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = Field(0.1, ge=0)  # below 1: a fraction of max_steps (TRL 1.x dropped warmup_ratio)
    optim: str = "adamw_torch"
    max_length: int = Field(256, gt=8)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(20, gt=0)
    save_total_limit: int = Field(2, gt=0)
    seed: int = 42
    lora: LoraSettings = Field(default_factory=LoraSettings)

    def trainer_args(self, output_dir: Path, model: ModelSettings, run_name: str) -> dict:
        precision = mixed_precision(model)
        return dict(
            output_dir=str(output_dir),
            run_name=run_name,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            per_device_eval_batch_size=self.per_device_eval_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler_type,
            warmup_steps=self.warmup_steps,
            optim=self.optim,
            max_length=self.max_length,
            gradient_checkpointing=self.gradient_checkpointing,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            logging_steps=self.logging_steps,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            seed=self.seed,
            report_to=["mlflow"],  # curves go to the stage's active MLflow run
            disable_tqdm=False,
        )


def resume_point(checkpoint_dir: Path) -> str | None:
    """The newest checkpoint a killed run left behind, so a re-run continues instead of restarting."""
    return get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None


def load_pairs(path: str):
    """A conversational preference file (written by tasks/data.py) as a `datasets.Dataset`."""
    from datasets import load_dataset

    return load_dataset("json", data_files=path, split="train")


def numeric(metrics: dict) -> dict[str, float]:
    """Trainer metrics as MLflow-safe names and floats."""
    return {key.replace("/", "_"): float(value) for key, value in metrics.items() if isinstance(value, (int, float))}
