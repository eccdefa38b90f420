"""How many processes train a stage and how they share the model, and which CUDA devices each gets.

The bottom of the training path: device bookkeeping only (the settings are in tasks/settings/plan.py).
`tasks/training.py` (`fit`) decides whether a stage trains in this process or is handed to
`tasks/launcher.py`, which runs the ranks' entry point `tasks/rank.py` under `accelerate launch`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tasks.base import PreftuneError

# The settings live in tasks/settings/plan.py; named here too for the modules that launch stages.
from tasks.settings.plan import ACCELERATE_CONFIGS, DistributedSettings  # noqa: F401

SHARDS_WEIGHTS = {"fsdp", "deepspeed_zero3"}  # each process holds 1/N of the frozen weights
SHARDS_TRAINING_STATE = {"fsdp", "deepspeed_zero2", "deepspeed_zero3"}  # 1/N of gradients and optimizer states


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
