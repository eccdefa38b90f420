"""Faults: a killed run resumes, out-of-memory retries with a smaller micro-batch, a full disk keeps
the previous checkpoint, user errors are not retried, and a down tracking server stops the run early or,
lost later, costs no training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import flow, task
from transformers import TrainerCallback

from tasks.base import PreftuneError, retry_unless_user_error
from tasks.data import DataSettings, apply_filter, format_split, load, split
from tasks.models import ModelSettings, RandomInitSettings, ResolvedModel, load_tokenizer
from tasks.policy import PolicySettings, train_policy_adapter
from tasks.recording import record_fit
from tasks.tracking import TrackingSettings, configure
from tasks.training import DiskFullError, read_fit, resume_point

REPO = Path(__file__).resolve().parent.parent
MODEL = ModelSettings(random_init=RandomInitSettings())


@pytest.fixture()
def pairs(tiny_model_path, tmp_path, tracking_uri):
    configure(TrackingSettings())
    settings = DataSettings(synthetic_rows=48)
    report = apply_filter(load(settings, tmp_path), settings, tmp_path)
    return format_split(split(report, settings, tmp_path), load_tokenizer(tiny_model_path, MODEL), tmp_path)


class OutOfMemoryAbove(TrainerCallback):
    """Fault injection: behaves like a GPU that cannot fit micro-batches larger than `limit`."""

    def __init__(self, limit: int):
        self.limit = limit

    def on_step_begin(self, args, state, control, **kwargs):
        if args.per_device_train_batch_size > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")


def test_out_of_memory_retry_halves_the_micro_batch(tiny_model_path, pairs, tmp_path):
    settings = PolicySettings(
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        keep_checkpoints=True,
        save_steps=2,
        max_length=96,
    )
    stage = tmp_path / "dpo"
    with pytest.raises(torch.OutOfMemoryError):
        train_policy_adapter(
            "dpo",
            settings,
            ResolvedModel(path=tiny_model_path, settings=MODEL),
            pairs,
            stage,
            callbacks=[OutOfMemoryAbove(2)],
        )
    # What the Prefect retry does: the same call again, which reads the recorded adjustment.
    train_policy_adapter(
        "dpo",
        settings,
        ResolvedModel(path=tiny_model_path, settings=MODEL),
        pairs,
        stage,
        callbacks=[OutOfMemoryAbove(2)],
    )
    args = torch.load(stage / "checkpoints" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)
    retried = json.loads((stage / "oom-adjustment.json").read_text())
    assert (retried["micro_batch"], retried["gradient_accumulation"], retried["effective_batch"]) == (2, 2, 4)
    assert "after an out-of-memory error" in retried["reasons"][-1]


def test_user_errors_are_not_retried_but_transient_ones_are():
    attempts = {"user": 0, "transient": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_user_error)
    def flaky(kind: str) -> str:
        attempts[kind] += 1
        if kind == "user":
            raise PreftuneError("bad column")
        if attempts[kind] < 3:
            raise ConnectionError("tracking server blinked")
        return "ok"

    @flow
    def both():
        return flaky("transient"), flaky("user", return_state=True)

    transient, user_state = both()
    assert transient == "ok" and attempts == {"user": 1, "transient": 3} and user_state.is_failed()


@pytest.fixture()
def small_disk(tmp_path):
    """A real filesystem that fills up: a tmpfs of a given size (needs permission to mount)."""
    mounts = []

    def make(size_bytes: int) -> Path:
        folder = tmp_path / f"disk-{len(mounts)}"
        folder.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill up here ({result.stderr.strip()})")
        mounts.append(folder)
        return folder

    yield make
    for folder in mounts:
        subprocess.run(["umount", str(folder)], check=False)


def test_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tiny_model_path, pairs, tmp_path, small_disk):
    settings = PolicySettings(
        max_steps=2, per_device_train_batch_size=4, save_steps=2, logging_steps=1, max_length=96, keep_checkpoints=True
    )
    train_policy_adapter(
        "dpo", settings, ResolvedModel(path=tiny_model_path, settings=MODEL), pairs, tmp_path / "probe"
    )
    checkpoint_bytes = sum(f.stat().st_size for f in (tmp_path / "probe" / "checkpoints" / "checkpoint-2").rglob("*"))
    disk = small_disk(int(checkpoint_bytes * 1.5))  # room for one checkpoint, not two

    longer = settings.model_copy(update={"max_steps": 4})
    with pytest.raises(DiskFullError, match="no space left while writing to .*: training resumes from .*checkpoint-2"):
        train_policy_adapter("dpo", longer, ResolvedModel(path=tiny_model_path, settings=MODEL), pairs, disk / "dpo")
    checkpoints = disk / "dpo" / "checkpoints"
    assert resume_point(checkpoints) == str(checkpoints / "checkpoint-2")  # the cut-short checkpoint-4 is skipped

    # Space freed (here: the folder moved to a roomy disk), the same call resumes and finishes.
    roomy = tmp_path / "dpo"
    shutil.copytree(disk / "dpo", roomy)
    train_policy_adapter("dpo", longer, ResolvedModel(path=tiny_model_path, settings=MODEL), pairs, roomy)
    state = json.loads((roomy / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]


@pytest.mark.slow(minutes=0.5)
def test_a_lost_tracking_server_costs_no_training_and_recording_resumes(tiny_model_path, pairs, tmp_path, monkeypatch):
    """Training talks to no tracking server; recording is its own step, which fails loudly while the
    server is down and, run again once it is back, records the whole curve (no step trained again)."""
    from flows.servers import start_mlflow
    from tasks.base import free_port

    settings = PolicySettings(max_steps=4, per_device_train_batch_size=4, logging_steps=1, max_length=96)
    fitted = train_policy_adapter(
        "dpo", settings, ResolvedModel(path=tiny_model_path, settings=MODEL), pairs, tmp_path / "dpo"
    )
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in seconds, not minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port, store = free_port(), tmp_path / "store"
    server = start_mlflow(port, store, tmp_path / "mlflow.log", workers=1)
    try:
        server.wait_until_healthy()
        configure(TrackingSettings(tracking_uri=server.url))
        server.stop()
        with pytest.raises(MlflowException, match="API request to"):
            record_fit("dpo", fitted, None, {})
        server = start_mlflow(port, store, tmp_path / "mlflow.log", workers=1)  # back up, same store
        server.wait_until_healthy()
        run_id = record_fit("dpo", fitted, None, {})
    finally:
        server.stop()
    history = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}").get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert read_fit(tmp_path / "dpo") == fitted  # what training left is intact


def test_unreachable_tracking_server_stops_before_training(tmp_path):
    with pytest.raises(PreftuneError, match="MLflow tracking server at http://127.0.0.1:9 is unreachable"):
        configure(TrackingSettings(tracking_uri="http://127.0.0.1:9"))


def _cli(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "preftune"), *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **kwargs,
    )


def test_cli_bad_input_exits_with_one_message(tmp_path, prefect_api):
    env = os.environ | prefect_api | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    run = _cli(
        "run",
        "--profile",
        "smoke",
        "--set",
        f"data.source={tmp_path / 'missing.jsonl'}",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        cwd=tmp_path,
        env=env,
    )
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 2, output[-3000:]
    assert f"preftune: data file not found: {tmp_path / 'missing.jsonl'}" in output
    assert "Traceback" not in output
