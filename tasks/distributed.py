"""How many processes train a stage and how they share the model, and which CUDA devices each gets.

The bottom of the training path: settings and device bookkeeping only. `tasks/training.py` (`fit`)
decides whether a stage trains in this process or is handed to `tasks/launcher.py`, which runs the
ranks' entry point `tasks/rank.py` under `accelerate launch`.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from tasks.base import PreftuneError, StrictModel

Strategy = Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
SHARDS_WEIGHTS = {"fsdp", "deepspeed_zero3"}  # each process holds 1/N of the frozen weights
SHARDS_TRAINING_STATE = {"fsdp", "deepspeed_zero2", "deepspeed_zero3"}  # 1/N of gradients and optimizer states


class DistributedSettings(StrictModel):
    """How many processes train each stage and how they share the model. One process needs no launcher;
    more run the stage under `accelerate launch` (on GPUs one process per card; on a CPU, gloo)."""

    num_processes: int = Field(1, ge=1, description="Processes that train each stage (GPUs: one per card); "
                                                    "more than 1 runs the stage under `accelerate launch`.")
    strategy: Strategy = Field("ddp", description="How the processes share the model: ddp copies it, fsdp and "
                                                  "deepspeed_zero3 shard weights, deepspeed_zero2 shards training state.")
    config_file: str | None = Field(None, description="An accelerate config file of your own, instead of "
                                                      "`configs/accelerate/<strategy>.yaml`.")
    main_process_port: int | None = Field(None, description="The ranks' rendezvous port; empty: a free one.")
    separate_process: bool = Field(False, description=(
        "Launch even a one-process stage in a process of its own (set for stages that train at the same time "
        "as others: model loading, RNGs and thread pools are process-wide state)."))

    def for_stages_in_parallel(self, parallel: bool) -> "DistributedSettings":
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


def is_main_process() -> bool:
    """Rank 0 of a launched stage, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


class DevicePool:
    """The CUDA devices this process hands out: each launched stage gets cards of its own, so stages that
    run at once (parallel reward aspects) never share one; a stage waits while too few are free."""

    def __init__(self):
        self._free: list[str] | None = None
        self._changed = threading.Condition()

    @staticmethod
    def visible() -> list[str]:
        import torch

        if not torch.cuda.is_available():
            return []
        given = os.environ.get("CUDA_VISIBLE_DEVICES")
        return given.split(",") if given else [str(index) for index in range(torch.cuda.device_count())]

    @contextmanager
    def claim(self, count: int) -> Iterator[str | None]:
        """`count` devices as a CUDA_VISIBLE_DEVICES value (None on a CPU) for as long as the stage trains."""
        with self._changed:
            if self._free is None:
                self._free = self.visible()
            total = len(self.visible())
            if not total:
                claimed = None
            else:
                if count > total:
                    raise PreftuneError(f"distributed.num_processes is {count} but {total} GPUs are visible")
                self._changed.wait_for(lambda: len(self._free) >= count)
                claimed, self._free = self._free[:count], self._free[count:]
        try:
            yield ",".join(claimed) if claimed else None
        finally:
            if claimed:
                with self._changed:
                    self._free += claimed
                    self._changed.notify_all()


DEVICES = DevicePool()


def stages_in_parallel(parallel_stages: bool | None) -> bool:
    """Whether independent stages (reward aspects, SFT) train at the same time: as configured, else
    exactly when this machine has several GPUs to give them."""
    return parallel_stages if parallel_stages is not None else len(DevicePool.visible()) > 1
