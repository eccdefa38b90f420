"""One launched rank (`accelerate launch -m tasks.rank launch.json`): train the stage from the spec
`tasks/launcher.py` wrote; rank 0 writes the finished stage's record."""

from __future__ import annotations

import atexit
import gc
import os
import sys
from pathlib import Path

from tasks.base import PreftuneError, redacted_credential_message, redacted_settings
from tasks.distributed import is_main_process
from tasks.launcher import LAUNCH_ENV, USER_ERROR, Launch
from tasks.training import train


def main(launch_file: str) -> None:
    """The launcher's spec from the environment (credentials included), else from the file (redacted)."""
    launch = Launch.model_validate_json(os.environ.get(LAUNCH_ENV) or Path(launch_file).read_text())
    stage_dir = Path(launch.stage_dir)
    try:
        if found := redacted_settings(launch.spec.model.settings.model_dump()):
            raise PreftuneError(redacted_credential_message(found))
        train(launch.spec, launch.plan, stage_dir)
    except PreftuneError as error:  # bad input or settings: the task raises it as such, without a retry
        if is_main_process():
            (stage_dir / USER_ERROR).write_text(str(error))
        raise


if __name__ == "__main__":
    atexit.register(gc.freeze)  # as flows/cli.py does: no last collection at exit
    main(sys.argv[1])
