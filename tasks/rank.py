"""One launched rank (`accelerate launch -m tasks.rank launch.json`): rebuild the stage's trainer from
the launch file `tasks/launcher.py` wrote and train it; rank 0 logs into the stage's MLflow run."""
from __future__ import annotations

import atexit
import gc
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import mlflow

from tasks.base import PreftuneError
from tasks.distributed import is_main_process
from tasks.launcher import USER_ERROR, decode_arguments, import_factory
from tasks.plan import TrainingPlan
from tasks.training import train_here


def main(launch_file: str) -> None:
    spec = json.loads(Path(launch_file).read_text())
    factory = import_factory(spec["factory"])
    arguments = decode_arguments(factory, spec["arguments"])
    plan = TrainingPlan.model_validate(spec["plan"])
    logs = is_main_process() and spec["mlflow_run_id"]
    try:
        make_trainer = factory(**arguments)
        with mlflow.start_run(run_id=spec["mlflow_run_id"]) if logs else nullcontext():
            train_here(make_trainer, arguments["settings"], plan, arguments["stage_dir"])
    except PreftuneError as error:  # bad input or settings: the task raises it as such, without a retry
        if is_main_process():
            (arguments["stage_dir"] / USER_ERROR).write_text(str(error))
        raise


if __name__ == "__main__":
    atexit.register(gc.freeze)  # as flows/cli.py does: no last collection at exit (~1.5 s of CPU per rank)
    main(sys.argv[1])
