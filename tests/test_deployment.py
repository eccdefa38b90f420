"""Production path: real Prefect and MLflow servers on loopback, the smoke deployment from
deployments/prefect.yaml run by a process worker (not in-process), checked through both APIs."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.servers import free_port, start_mlflow, start_prefect

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"


@pytest.fixture()
def servers(tmp_path):
    prefect_home = tmp_path / "prefect-home"
    prefect = start_prefect(free_port(), tmp_path / "prefect.log", env={"PREFECT_HOME": str(prefect_home)})
    mlflow = start_mlflow(free_port(), tmp_path / "mlflow", tmp_path / "mlflow.log")
    try:
        prefect.wait_until_healthy()
        mlflow.wait_until_healthy()
        yield prefect, mlflow, prefect_home
    finally:
        prefect.stop()
        mlflow.stop()


async def _wait_for(flow_run_id, timeout_s: float = 600):
    async with get_client() as client:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = await client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                artifacts = await client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
                return run, artifacts
            await asyncio.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout_s} s")


async def _create_pools():
    template = json.loads((REPO / "deployments" / "k8s-gpu-job-template.json").read_text())
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name="preftune-local", type="process"))
        # The server validates the Kubernetes job template (every placeholder declared as a variable).
        await client.create_work_pool(WorkPoolCreate(name="preftune-gpu", type="kubernetes", base_job_template=template))
        return await client.read_work_pool("preftune-gpu")


def test_smoke_deployment_runs_through_a_worker(servers, tmp_path, tiny_model_path):
    prefect, mlflow, prefect_home = servers
    api = f"{prefect.url}/api"
    env = os.environ | {"PREFECT_API_URL": api, "PREFECT_HOME": str(prefect_home), "MLFLOW_TRACKING_URI": mlflow.url,
                        "PREFTUNE_HOME": str(REPO)}
    worker = None
    with temporary_settings({PREFECT_API_URL: api}):
        gpu_pool = asyncio.run(_create_pools())
        assert gpu_pool.base_job_template["variables"]["properties"]["gpu_count"]["default"] == 1
        deploy = subprocess.run([str(BIN / "preftune"), "deploy"], env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        try:
            worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "preftune-local"],
                                      env=env, cwd=tmp_path, stdout=open(tmp_path / "worker.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True)
            flow_run = run_deployment("preference-tuning/smoke", timeout=0, parameters={
                "config": {"profile": "smoke", "runs_dir": str(tmp_path / "runs")}})
            run, artifacts = asyncio.run(_wait_for(flow_run.id))
        finally:
            if worker:
                os.killpg(worker.pid, signal.SIGINT)  # workers stop before their server
                worker.wait(30)
    assert run.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
    assert {"evaluation-report", "promotion", "run-summary", "data-filter"} <= {a.key for a in artifacts}
    assert {a.data for a in artifacts if a.type == "progress"} == {100.0}  # one per training stage, all done
    summary = next(a for a in artifacts if a.key == "run-summary")
    assert mlflow.url in summary.data  # links to the MLflow run

    client = MlflowClient(tracking_uri=mlflow.url, registry_uri=mlflow.url)
    [parent] = client.search_runs([client.get_experiment_by_name("preftune").experiment_id],
                                  filter_string=f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert parent.info.status == "FINISHED" and parent.data.params["profile"] == "smoke"
    assert "dpo_implicit_reward_accuracy" in parent.data.metrics
    version = client.get_model_version_by_alias("preftune-policy", "candidate")
    assert version.tags["prefect.flow_run_id"] == str(run.id)
    assert {"git.commit", "config.sha256", "data.sha256"} <= version.tags.keys()
    assert version.source and version.run_id
