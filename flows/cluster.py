"""The image the cluster runs, read from the one place that names it: the `images` entry of
deployments/k8s/kustomization.yaml, which kustomize applies to the worker and the servers and
`preftune deploy` passes to the flow-run Jobs (deployments/prefect.yaml's `{{ $PREFTUNE_IMAGE }}`)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tasks.base import PreftuneError

KUSTOMIZATION = Path(__file__).resolve().parent.parent / "deployments" / "k8s" / "kustomization.yaml"
IMAGE_NAME = "preftune"  # the name the manifests use and the kustomization rewrites


def cluster_image(kustomization: Path = KUSTOMIZATION) -> str:
    """`NAME:TAG` or `NAME@DIGEST` as the kustomization sets it for the image called `preftune`."""
    images = yaml.safe_load(kustomization.read_text()).get("images") or []
    entry = next((image for image in images if image.get("name") == IMAGE_NAME), None)
    if entry is None:
        raise PreftuneError(f"{kustomization} names no image {IMAGE_NAME!r} under `images`")
    name = entry.get("newName", IMAGE_NAME)
    if entry.get("digest"):
        return f"{name}@{entry['digest']}"
    if not entry.get("newTag"):
        raise PreftuneError(f"{kustomization}: image {IMAGE_NAME!r} has neither newTag nor digest")
    return f"{name}:{entry['newTag']}"


def deploy_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """What `prefect deploy` needs to fill in book-gpu's image: PREFTUNE_IMAGE as set, else the
    kustomization's."""
    environ = dict(os.environ if environ is None else environ)
    return {"PREFTUNE_IMAGE": environ.get("PREFTUNE_IMAGE") or cluster_image()}
