"""A training stage on several processes: the stage runs under `accelerate launch`.

The Prefect task keeps what it always has (the stage folder, retries): it writes the stage's trainer
spec and plan into `launch.json` in the stage folder, runs `accelerate launch -m tasks.rank` with the
strategy's accelerate config (`configs/accelerate/`), streams the ranks' output into the task's log and
reads the finished stage back from the folder. A non-zero exit is an ordinary task failure that Prefect
retries; the ranks then resume from the last complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from tasks.base import PreftuneError, free_port
from tasks.distributed import DistributedSettings
from tasks.plan import TrainingPlan
from tasks.trainer import TrainerSpec

log = logging.getLogger(__name__)
LAUNCH_FILE = "launch.json"
LAUNCH_ENV = "PREFTUNE_LAUNCH"  # what the ranks train, credentials included, in their environment only
USER_ERROR = "launch-user-error.txt"  # a rank's PreftuneError, for the task to raise as such


class Launch(BaseModel):
    """What every rank trains: the stage's spec as the task built it, the plan, and the stage folder."""

    spec: TrainerSpec
    plan: TrainingPlan
    stage_dir: str


def launch(
    spec: TrainerSpec, plan: TrainingPlan, stage_dir: Path, settings: DistributedSettings, devices: str | None = None
) -> None:
    """Run the stage on `settings.num_processes` ranks; a rank's failure fails the launch (and the task)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    launch = Launch(spec=spec, plan=plan, stage_dir=str(stage_dir))
    launch_file = stage_dir / LAUNCH_FILE
    launch_file.write_text(launch.model_dump_json(indent=1))  # on disk with its credentials redacted
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(settings.accelerate_config()),
        "--num_processes",
        str(settings.num_processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(settings.main_process_port or free_port()),
    ]
    if plan.device_kind == "cpu":  # the cores shared out, not oversubscribed
        command += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // settings.num_processes))]
    command += ["-m", "tasks.rank", str(launch_file)]
    env = (
        os.environ
        | {
            LAUNCH_ENV: json.dumps(launch.model_dump(), default=str),  # the real values, never on disk
            "PYTHONUNBUFFERED": "1",
            "TQDM_MININTERVAL": "30",
        }
        | (  # progress bars become log lines here: one per 30 s is enough
            {"CUDA_VISIBLE_DEVICES": devices} if devices else {}
        )
    )
    logger = task_logger()
    logger.info(
        "%s: %d processes (%s) on %s: %s",
        stage_dir.parent.name,
        settings.num_processes,
        settings.strategy,
        f"GPUs {devices}" if devices else "the CPU",
        " ".join(command),
    )
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
        raise RuntimeError(
            f"{stage_dir.parent.name}: accelerate launch exited with code {process.returncode}; "
            f"a retry resumes from the last checkpoint in {stage_dir / 'checkpoints'}. Last lines:\n" + "\n".join(tail)
        )


def task_logger():
    """The Prefect task's logger inside a task run, this module's outside one."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log
