"""How a training stage is fitted to the device and spread over processes: settings only, no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.base import PreftuneError, StrictModel

Strategy = Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs" / "accelerate"


class PlanSettings(StrictModel):
    """`auto` (default) fits the training to the device; `recipe` runs the profile's settings verbatim."""

    mode: Literal["auto", "recipe"] = Field(
        "auto",
        description=(
            "auto: fit quantization, micro-batch, checkpointing and optimizer to the device; recipe: the profile's "
            "settings verbatim (only precision fitted)."
        ),
    )
    memory_fraction: float = Field(
        0.85, gt=0, le=1, description="Share of the device's free memory a stage's estimated peak may fill."
    )


class DistributedSettings(StrictModel):
    """How many processes train each stage and how they share the model. One process needs no launcher;
    more run the stage under `accelerate launch` (on GPUs one process per card; on a CPU, gloo)."""

    num_processes: int = Field(
        1,
        ge=1,
        description="Processes that train each stage (GPUs: one per card); "
        "more than 1 runs the stage under `accelerate launch`.",
    )
    strategy: Strategy = Field(
        "ddp",
        description="How the processes share the model: ddp copies it, fsdp and "
        "deepspeed_zero3 shard weights, deepspeed_zero2 shards training state.",
    )
    config_file: str | None = Field(
        None, description="An accelerate config file of your own, instead of `configs/accelerate/<strategy>.yaml`."
    )
    main_process_port: int | None = Field(None, description="The ranks' rendezvous port; empty: a free one.")
    separate_process: bool = Field(
        False,
        description=(
            "Launch even a one-process stage in a process of its own (set for stages that train at the same time "
            "as others: model loading, RNGs and thread pools are process-wide state)."
        ),
    )

    def for_stages_in_parallel(self, parallel: bool) -> DistributedSettings:
        """Stages that train at the same time each train in a process of their own."""
        return self.model_copy(update={"separate_process": self.separate_process or parallel})

    @property
    def launched(self) -> bool:
        return self.num_processes > 1 or self.separate_process

    def accelerate_config(self) -> Path:
        path = Path(self.config_file).expanduser() if self.config_file else ACCELERATE_CONFIGS / f"{self.strategy}.yaml"
        if not path.is_file():
            raise PreftuneError(f"distributed.config_file {path} does not exist")
        return path
