"""What the deployments need on the server, created when missing: the work pools that
deployments/prefect.yaml names, and the concurrency limit on the training tasks' `gpu` tag."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tasks.base import PreftuneError
from tasks.training import GPU_TAG

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
                raise PreftuneError(
                    f"work pool {name!r} named in prefect.yaml does not exist on the server and "
                    f"preftune does not know how to create it: create it with `prefect work-pool create`"
                )
            kind, template = WORK_POOLS[name]
            client.create_work_pool(
                WorkPoolCreate(name=name, type=kind, base_job_template=job_template(kind, template))
            )
            created.append(name)
    return created


def gpu_slots() -> int:
    """One training task per GPU of this machine, and one on a machine without any (a CPU trains
    one at a time well; two would halve each other's speed and double the memory)."""
    import torch

    return max(1, torch.cuda.device_count())


def ensure_gpu_limit(slots: int | None = None) -> tuple[int, bool]:
    """The tag concurrency limit on `gpu`: created with `slots` (default: this machine's GPUs; the limit
    is server-wide, so the GPUs of all workers together) when missing, so that workers never run more
    training tasks at once than there are GPUs; an existing one
    is left as it is (someone sized it). Prefect 3.9 keeps it as the global limit `tag:gpu`; the task
    engine holds a slot of it for each task run with the tag, on a lease it renews, so a worker that
    dies gives its slot back. Returns the limit's size and whether it was created."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit, False
        except ObjectNotFound:
            pass
        slots = slots or gpu_slots()
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=slots)
        return slots, True
