"""Training on several processes by configuration: the stage runs under `accelerate launch`.

The Prefect task keeps what it always has (the stage folder, the stage's MLflow run, retries): it
writes what the stage trains into `launch.json` in the stage folder, runs `accelerate launch -m
tasks.distributed` with the strategy's accelerate config (`configs/accelerate/`), streams the ranks'
output into the task's log and reads the finished stage back from the folder. A non-zero exit is an
ordinary task failure that Prefect retries; the ranks then resume from the last complete checkpoint.
Rank 0 logs into the stage's MLflow run; the other ranks log nothing.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import threading
import typing
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Literal

from pydantic import Field, TypeAdapter

from tasks.base import PreftuneError, StrictModel, free_port

log = logging.getLogger(__name__)
Strategy = Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
SHARDS_WEIGHTS = {"fsdp", "deepspeed_zero3"}  # each process holds 1/N of the frozen weights
SHARDS_TRAINING_STATE = {"fsdp", "deepspeed_zero2", "deepspeed_zero3"}  # 1/N of gradients and optimizer states
LAUNCH_FILE = "launch.json"
USER_ERROR = "launch-user-error.txt"  # a rank's PreftuneError, for the task to raise as such


class DistributedSettings(StrictModel):
    """How many processes train each stage and how they share the model. One process needs no launcher;
    more run the stage under `accelerate launch` (on GPUs one process per card; on a CPU, gloo)."""

    num_processes: int = Field(1, ge=1)
    strategy: Strategy = "ddp"
    config_file: str | None = None  # an accelerate config of your own instead of configs/accelerate/<strategy>.yaml
    main_process_port: int | None = None  # None: a free port
    # Launched even as one process: set for stages that train at the same time as others, since
    # model loading, RNGs and thread pools are process-wide state two trainers must not share.
    separate_process: bool = False

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


def _hints(factory: Callable) -> dict[str, object]:
    return {name: hint for name, hint in typing.get_type_hints(factory).items() if name != "return"}


def encode_arguments(factory: Callable, arguments: dict) -> dict:
    """The factory's arguments as JSON, typed by its signature (so the ranks rebuild the same objects)."""
    hints = _hints(factory)
    return {name: TypeAdapter(hints[name]).dump_python(value, mode="json") for name, value in arguments.items()}


def decode_arguments(factory: Callable, encoded: dict) -> dict:
    hints = _hints(factory)
    return {name: TypeAdapter(hints[name]).validate_python(value) for name, value in encoded.items()}


def _import(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


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


def fit_stage(factory: Callable, settings, plan, stage_dir: Path, distributed: DistributedSettings | None = None,
              **inputs):
    """Train one stage: `factory(settings=..., stage_dir=..., **inputs)` returns the stage's `make_trainer`
    (see `tasks.training.fit`). In this process, or launched: on `distributed.num_processes` processes, and
    on a machine with several GPUs always (so each stage trains on cards of its own)."""
    from tasks.training import fit, finished_fit, read_fit

    distributed = distributed or DistributedSettings()
    arguments = {"settings": settings, "stage_dir": stage_dir} | inputs
    if not (distributed.launched or len(DevicePool.visible()) > 1):
        return fit(factory(**arguments), settings, plan, stage_dir)
    if done := finished_fit(settings, stage_dir):
        return done
    if inputs.get("callbacks"):
        raise PreftuneError("trainer callbacks cannot cross into launched processes: train in one process")
    with DEVICES.claim(distributed.num_processes) as devices:
        launch(factory, arguments, plan, stage_dir, distributed, devices)
    return read_fit(stage_dir)


def launch(factory: Callable, arguments: dict, plan, stage_dir: Path, settings: DistributedSettings,
           devices: str | None = None) -> None:
    """Run the stage on `settings.num_processes` ranks; a rank's failure fails the launch (and the task)."""
    import mlflow

    stage_dir.mkdir(parents=True, exist_ok=True)
    run = mlflow.active_run()
    spec = {"factory": f"{factory.__module__}:{factory.__name__}", "plan": plan.model_dump(mode="json"),
            "arguments": encode_arguments(factory, arguments), "mlflow_run_id": run.info.run_id if run else None}
    launch_file = stage_dir / LAUNCH_FILE
    launch_file.write_text(json.dumps(spec, indent=1))
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(settings.accelerate_config()), "--num_processes", str(settings.num_processes),
               "--num_machines", "1", "--main_process_port", str(settings.main_process_port or free_port())]
    if plan.device_kind == "cpu":  # the cores shared out, not oversubscribed
        command += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // settings.num_processes))]
    command += ["-m", "tasks.distributed", str(launch_file)]
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_RUN_ID"} | {
        "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PYTHONUNBUFFERED": "1",
        "TQDM_MININTERVAL": "30"} | (  # progress bars become log lines here: one per 30 s is enough
        {"CUDA_VISIBLE_DEVICES": devices} if devices else {})
    logger = task_logger()
    logger.info("%s: %d processes (%s) on %s: %s", stage_dir.parent.name, settings.num_processes, settings.strategy,
                f"GPUs {devices}" if devices else "the CPU", " ".join(command))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in process.stdout:  # the ranks' output, into the task's log (and the Prefect UI)
        logger.info("%s", line.rstrip())
        tail = (tail + [line.rstrip()])[-20:]
    if process.wait() != 0:
        if (user_error := stage_dir / USER_ERROR).is_file():  # bad input or settings: say it once, no retry
            message = user_error.read_text()
            user_error.unlink()
            raise PreftuneError(message)
        raise RuntimeError(f"{stage_dir.parent.name}: accelerate launch exited with code {process.returncode}; "
                           f"a retry resumes from the last checkpoint in {stage_dir / 'checkpoints'}. Last lines:\n"
                           + "\n".join(tail))


def task_logger():
    """The Prefect task's logger inside a task run, this module's outside one."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def main(launch_file: str) -> None:
    """One rank: rebuild the stage's trainer from the launch file and train (rank 0 into the stage's run)."""
    import mlflow

    from tasks.plan import TrainingPlan
    from tasks.training import fit

    spec = json.loads(Path(launch_file).read_text())
    factory = _import(spec["factory"])
    arguments = decode_arguments(factory, spec["arguments"])
    plan = TrainingPlan.model_validate(spec["plan"])
    logs = is_main_process() and spec["mlflow_run_id"]
    try:
        make_trainer = factory(**arguments)
        with mlflow.start_run(run_id=spec["mlflow_run_id"]) if logs else nullcontext():
            fit(make_trainer, arguments["settings"], plan, arguments["stage_dir"])
    except PreftuneError as error:
        if is_main_process():
            (arguments["stage_dir"] / USER_ERROR).write_text(str(error))
        raise


if __name__ == "__main__":
    main(sys.argv[1])
