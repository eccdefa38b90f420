"""What every stage task of one flow run shares, passed as one argument instead of three."""

from __future__ import annotations

from pydantic import BaseModel, Field

from tasks.base import Workspace
from tasks.distributed import DistributedSettings


class RunContext(BaseModel):
    """The run's folder, its MLflow parent run, and how its training processes are launched. Stage keys
    take the workspace from it, never the MLflow run or the launcher settings (neither changes a result)."""

    workspace: Workspace
    parent_run_id: str | None = None
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
