"""The work pools that deployments/prefect.yaml names, created on the server when missing."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from tasks.base import PreftuneError

DEPLOYMENTS = Path(__file__).resolve().parent.parent / "deployments"
# Pool name -> (worker type, base job template in deployments/ or None for the type's default).
WORK_POOLS = {
    "preftune-local": ("process", None),
    "preftune-gpu": ("kubernetes", "k8s-gpu-job-template.json"),
}


def pools_in_use(prefect_file: Path = DEPLOYMENTS / "prefect.yaml") -> set[str]:
    deployments = yaml.safe_load(prefect_file.read_text())["deployments"]
    return {d["work_pool"]["name"] for d in deployments if d.get("work_pool")}


def job_template(kind: str, template: str | None) -> dict:
    """Ours from deployments/, else the worker type's default (what `prefect work-pool create` uses)."""
    if template:
        return json.loads((DEPLOYMENTS / template).read_text())
    from prefect.workers.base import BaseWorker

    return BaseWorker.get_worker_class_from_type(kind).get_default_base_job_template()


def ensure_work_pools() -> list[str]:
    """Create each pool the deployments use that the server lacks; the server validates a
    Kubernetes job template (every placeholder declared as a variable) when it is created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name in sorted(pools_in_use()):
            try:
                client.read_work_pool(name)
                continue
            except ObjectNotFound:
                pass
            if name not in WORK_POOLS:
                raise PreftuneError(f"work pool {name!r} named in prefect.yaml does not exist on the server and "
                                    f"preftune does not know how to create it: create it with `prefect work-pool create`")
            kind, template = WORK_POOLS[name]
            client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=job_template(kind, template)))
            created.append(name)
    return created
