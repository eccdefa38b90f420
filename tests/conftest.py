"""Shared fixtures: Prefect's own test harness (a temporary server and database), the public
data samples beside the repository, and small real models built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """GPU tests run where CUDA is, and are reported as skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """Flows in tests run against a throwaway Prefect server and database, as Prefect recommends."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the public data samples are not beside the repository ({SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """A tiny random Llama with the real SmolLM2 tokenizer (converted from the packaged GGUF)."""
    from tasks.models import ModelSettings, RandomInitSettings, resolve_model_path

    return resolve_model_path(ModelSettings(random_init=RandomInitSettings()))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from tasks.models import ModelSettings, resolve_model_path

    return resolve_model_path(ModelSettings())


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """Each test gets its own MLflow store, and the default ./mlflow store is never touched."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri
