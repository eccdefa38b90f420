"""Shared fixtures: Prefect's own test harness (a temporary server and database), the public
data samples beside the repository, and small real models built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


# A busy machine (a flow training beside the tests, a shared CI runner) slows every process: Prefect's
# servers get time to start and SQLite writers time to wait their turn, instead of failing the test.
PATIENT_PREFECT = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
    "PREFECT_SERVER_DATABASE_TIMEOUT": "120",
    "PREFECT_API_REQUEST_TIMEOUT": "300",
}


# Two workers (and their subprocesses) share two cores: OpenMP threads that spin while they wait for work
# take the cores from each other (two SmolLM2 forward loops at once: 37 s each spinning, 14 s sleeping; 7.4 s
# for one alone, 9.9 s sleeping). Read once, when torch loads its OpenMP runtime: set before any test imports it.
SHARED_CORES = {"OMP_WAIT_POLICY": "PASSIVE"}


# IFEval's checkers read NLTK's punkt_tab tables, which cannot be downloaded offline: the copy beside the repository.
NLTK_TABLES = {"NLTK_DATA": str(SHARED_DATA / "nltk_data")} if (SHARED_DATA / "nltk_data").is_dir() else {}


def pytest_configure(config):
    for name, value in (PATIENT_PREFECT | SHARED_CORES | NLTK_TABLES).items():
        os.environ.setdefault(name, value)


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first, the costliest first (so the two workers of `make test` never end on
    one long file while the other idles); GPU tests run where CUDA is, and are reported as skipped elsewhere."""
    import torch

    minutes: dict = {}  # a file's cost, as its costliest test states it: `slow(minutes=...)` (1 when not given)
    for item in items:
        if marker := item.get_closest_marker("slow"):
            minutes[item.path] = max(minutes.get(item.path, 0), marker.kwargs.get("minutes", 1))
    items.sort(key=lambda item: -minutes.get(item.path, 0))  # stable: the order within each file is kept

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


MLFLOW_PROCESS_STORE = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


@pytest.fixture(autouse=True)
def mlflow_store_not_inherited():
    """`tasks.tracking.configure` points the whole process at a store, as a run should; a test must not
    leave the next test on its worker writing to that store (a stopped server's URL made a later test
    fail after minutes of retries)."""
    saved = {name: os.environ.get(name) for name in MLFLOW_PROCESS_STORE}
    yield
    if (mlflow := sys.modules.get("mlflow")) is not None:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None: back to "not set", env var included
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """Flows in tests run against a throwaway Prefect server and database, as Prefect recommends."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def prefect_api() -> dict[str, str]:
    """For a CLI run in a subprocess: this worker's test server, instead of a temporary server of its own
    (~11 s of start-up on two cores, per run)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the public data samples are not beside the repository ({SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def punkt() -> None:
    """IFEval's checkers need NLTK's punkt_tab: beside the repository, installed, or downloadable."""
    from tasks.base import PreftuneError
    from tasks.instructions import require_punkt

    try:
        require_punkt()
    except PreftuneError:
        pytest.skip(
            f"NLTK's punkt_tab tables are neither beside the repository ({SHARED_DATA / 'nltk_data'}) nor "
            "installed, and cannot be downloaded"
        )


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """A tiny random Llama with the real SmolLM2 tokenizer (converted from the packaged GGUF, or the
    tokenizer folder PREFTUNE_TEST_BASE_MODEL names, as the GPU check carries it to a card)."""
    from tasks.models import resolve_model_path
    from tasks.settings.models import DEFAULT_BASE_MODEL, ModelSettings, RandomInitSettings

    base = os.environ.get("PREFTUNE_TEST_BASE_MODEL", DEFAULT_BASE_MODEL)
    return resolve_model_path(ModelSettings(base_model=base, random_init=RandomInitSettings()))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from tasks.models import resolve_model_path
    from tasks.settings.models import ModelSettings

    return resolve_model_path(ModelSettings())


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """Each test gets its own MLflow store, and the default ./mlflow store is never touched."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(scope="session")
def coin_judge_path(tiny_model_path, tmp_path_factory) -> str:
    """A sequence-classification model whose score head was never trained: a judge at chance."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("coin-judge")
    torch.manual_seed(3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    coin = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    coin.config.pad_token_id = tokenizer.pad_token_id
    coin.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
