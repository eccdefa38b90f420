"""Production path: real Prefect and MLflow servers on loopback, on PostgreSQL as `preftune ui --database`
runs them, the smoke deployment from deployments/prefect.yaml run by a process worker (not in-process),
checked through both APIs and in the databases themselves."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import sqlalchemy
import torch
from mlflow import MlflowClient
from postgres import postgres_bin, postgres_cluster
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.pools import GPU_TAG, ensure_gpu_limit
from flows.servers import MLFLOW_DATABASE, PREFECT_DATABASE, ServerSecrets, postgres_stores, start_servers
from tasks.base import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"


@pytest.fixture()
def postgres():
    """A throwaway PostgreSQL cluster. Missing binaries fail the test: CI must run it (make test installs them)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL's server (initdb) is neither on PATH nor under /usr/lib/postgresql/*/bin: "
            "install it (apt-get install postgresql), as make test does"
        )
    with postgres_cluster(bin_dir) as cluster:
        yield cluster


@pytest.fixture()
def servers(tmp_path, postgres):
    """Both servers on PostgreSQL, started as `preftune ui --database` starts them."""
    prefect_home = tmp_path / "prefect-home"
    # The password as `preftune ui --secrets-file` passes it: to the database check and, as PGPASSWORD, to both servers.
    secrets = ServerSecrets(PGPASSWORD=postgres.password)
    stores = postgres_stores(postgres.url, tmp_path / "mlflow", secrets=secrets)
    assert stores.created == (PREFECT_DATABASE, MLFLOW_DATABASE)
    assert postgres.password not in "".join(stores.describe()) + stores.prefect_database + stores.mlflow_backend
    prefect, mlflow = start_servers(
        free_port(), free_port(), stores, tmp_path, {"PREFECT_HOME": str(prefect_home)}, secrets, mlflow_workers=1
    )
    try:
        yield prefect, mlflow, prefect_home, stores, postgres.password
    finally:
        prefect.stop()
        mlflow.stop()


def _query(database: tuple[str, str], statement: str, **params) -> list[tuple]:
    """`database`: a URL without a password, and the password."""
    url, password = database
    engine = sqlalchemy.create_engine(url.replace("+asyncpg", "+psycopg2"), connect_args={"password": password})
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sqlalchemy.text(statement), params)]
    finally:
        engine.dispose()


async def _wait_until(flow_run_id, done, timeout_s: float):
    """The flow run once `done(run)` holds; waits on the run's state, not on a fixed time."""
    async with get_client() as client:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = await client.read_flow_run(flow_run_id)
            if run.state and done(run):
                return run
            await asyncio.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} did not get there in {timeout_s} s")


async def _wait_for(flow_run_id, timeout_s: float = 600):
    run = await _wait_until(flow_run_id, lambda run: run.state.is_final(), timeout_s)
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return run, artifacts


async def _pools_and_deployments():
    async with get_client() as client:
        pools = {pool.name: pool for pool in await client.read_work_pools()}
        return pools, {deployment.name for deployment in await client.read_deployments()}


def _approve_through_a_suspended_run(tracking_uri: str):
    """The promotion deployment with `approval: person`, as the training flow starts it for a passing
    candidate: the run suspends (its process ends, the worker holds nothing), a person answers the form,
    and the worker starts it again, which promotes. The smoke candidate's verdict is replaced by a
    passing one first: the gate is not what this checks."""
    import mlflow as tracking
    from prefect.flow_runs import resume_flow_run
    from test_promotion import passed

    from tasks.promotion import record_decision

    name = "preftune-smoke-policy"
    tracking.set_tracking_uri(tracking_uri)
    version = MlflowClient().get_model_version_by_alias(name, "candidate").version
    with tracking.start_run(run_name="a passing verdict"):
        record_decision(name, version, passed())
    waiting = run_deployment(
        "promote-candidate/promote",
        timeout=0,
        parameters={
            "model_name": name,
            "version": version,
            "tracking": {"tracking_uri": tracking_uri, "policy_model_name": name, "promotion": {"approval": "person"}},
        },
    )
    suspended = asyncio.run(_wait_until(waiting.id, lambda run: run.state.name == "Suspended", 300))
    resume_flow_run(waiting.id, run_input={"approve": True, "approved_by": "Ada Lovelace", "reason": "read the report"})
    resumed, _ = asyncio.run(_wait_for(waiting.id, 300))
    if resumed.state.is_completed():
        champion = MlflowClient().get_model_version_by_alias(name, "champion")
        assert champion.version == version and champion.tags["promotion.approved_by"] == "Ada Lovelace"
    return suspended, resumed


@pytest.mark.slow(minutes=1.9)
def test_smoke_deployment_runs_through_a_worker(servers, tmp_path, tiny_model_path):
    prefect, mlflow, prefect_home, stores, password = servers
    mlflow_db, prefect_db = (stores.mlflow_backend, password), (stores.prefect_database, password)
    api = f"{prefect.url}/api"
    env = os.environ | {
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(prefect_home),
        "MLFLOW_TRACKING_URI": mlflow.url,
        "PREFTUNE_HOME": str(REPO),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    worker = None
    with temporary_settings({PREFECT_API_URL: api}):
        # On an empty server: deploy creates the work pools prefect.yaml names, then every deployment.
        deploy = subprocess.run(
            [str(BIN / "preftune"), "deploy"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        assert "created work pool preftune-gpu" in deploy.stdout and "created work pool preftune-local" in deploy.stdout
        slots = max(1, torch.cuda.device_count())
        assert f"created concurrency limit on tag 'gpu': {slots} " in deploy.stdout
        assert ensure_gpu_limit(slots + 1) == (slots, False)  # an existing limit is left as it is
        pools, deployments = asyncio.run(_pools_and_deployments())
        assert pools["preftune-local"].type == "process" and pools["preftune-gpu"].type == "kubernetes"
        assert pools["preftune-gpu"].base_job_template["variables"]["properties"]["gpu_count"]["default"] == 1
        assert deployments == {"nightly-quickstart", "smoke", "book-gpu", "promote"}
        try:
            worker = subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", "preftune-local"],
                env=env,
                cwd=tmp_path,
                stdout=open(tmp_path / "worker.log", "w"),  # noqa: SIM115 (the worker's, while it lives)
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            flow_run = run_deployment(
                "preference-tuning/smoke",
                timeout=0,
                parameters={"config": {"profile": "smoke", "runs_dir": str(tmp_path / "runs")}},
            )
            run, artifacts = asyncio.run(_wait_for(flow_run.id))
            if run.state.is_completed():
                promotion = _approve_through_a_suspended_run(mlflow.url)
        finally:
            if worker:
                os.killpg(worker.pid, signal.SIGINT)  # workers stop before their server
                try:
                    worker.wait(120)
                except subprocess.TimeoutExpired:  # a slow shutdown is not what this test checks
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
    assert run.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
    suspended, resumed = promotion
    assert suspended.state.name == "Suspended" and suspended.state.state_details.pause_reschedule  # its process ended
    assert resumed.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
    assert {"evaluation-report", "promotion", "run-summary", "data-filter", "training-plan"} <= {
        a.key for a in artifacts
    }
    assert {a.data for a in artifacts if a.type == "progress"} == {100.0}  # one per training stage, all done
    summary = next(a for a in artifacts if a.key == "run-summary")
    assert mlflow.url in summary.data  # links to the MLflow run

    client = MlflowClient(tracking_uri=mlflow.url, registry_uri=mlflow.url)
    [parent] = client.search_runs(
        [client.get_experiment_by_name("preftune").experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{run.id}'",
    )
    assert parent.info.status == "FINISHED" and parent.data.params["profile"] == "smoke"
    assert "implicit_reward.accuracy.ci_low" in parent.data.metrics
    version = client.get_model_version_by_alias("preftune-smoke-policy", "candidate")
    assert version.tags["prefect.flow_run_id"] == str(run.id)
    assert {"git.commit", "config.sha256", "data.sha256"} <= version.tags.keys()
    assert version.source and version.run_id

    # Everything is in PostgreSQL: MLflow's runs and model versions, Prefect's flow run and the
    # training tasks, whose `gpu` tag the concurrency limit deploy created holds to its size.
    [(status,)] = _query(mlflow_db, "SELECT status FROM runs WHERE run_uuid = :id", id=parent.info.run_id)
    assert status == "FINISHED"
    versions = {
        (name, str(number)): (run_id, source, artifact_uri)
        for name, number, run_id, source, artifact_uri in _query(
            mlflow_db,
            "SELECT v.name, v.version, v.run_id, v.source, r.artifact_uri FROM "
            "model_versions v JOIN runs r ON r.run_uuid = v.run_id",
        )
    }
    assert {name for name, _ in versions} == {
        "preftune-smoke-policy",
        "preftune-smoke-reward-helpfulness",
        "preftune-smoke-reward-harmlessness",
    }
    assert versions[version.name, version.version][0] == version.run_id
    flow_runs = _query(prefect_db, "SELECT state_type FROM flow_run WHERE id = :id", id=run.id)
    assert flow_runs == [("COMPLETED",)]
    assert (
        _query(
            prefect_db,
            "SELECT count(*) FROM task_run WHERE flow_run_id = :id AND tags::jsonb ? :tag",
            id=run.id,
            tag=GPU_TAG,
        )[0][0]
        >= 4
    )  # two reward models, SFT, the policy
    assert _query(
        prefect_db, 'SELECT "limit", active FROM concurrency_limit_v2 WHERE name = :name', name=f"tag:{GPU_TAG}"
    ) == [(slots, True)]
    # The models' files went to the MLflow server, which keeps them under its artifacts destination.
    destination = Path(stores.artifacts.removeprefix("file://"))
    for run_id, source, artifact_uri in versions.values():
        assert artifact_uri.startswith("mlflow-artifacts:/") and source.startswith(f"runs:/{run_id}/"), source
        folder = destination / artifact_uri.removeprefix("mlflow-artifacts:/") / source.removeprefix(f"runs:/{run_id}/")
        assert (folder / "MLmodel").is_file()


def test_ui_serves_both_servers_on_loopback_and_stops_them_on_ctrl_c(tmp_path):
    ports = {"prefect": free_port(), "mlflow": free_port()}
    ui = subprocess.Popen(
        [
            str(BIN / "preftune"),
            "ui",
            "--prefect-port",
            str(ports["prefect"]),
            "--mlflow-port",
            str(ports["mlflow"]),
            "--mlflow-workers",
            "1",
            "--store",
            str(tmp_path / "store"),
        ],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ | {"PREFECT_HOME": str(tmp_path / "prefect-home")},
    )
    try:
        lines = []
        while not any(line.startswith("Logs in") for line in lines):  # printed once both answer
            line = ui.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        urls = {f"http://127.0.0.1:{ports['prefect']}/api/health", f"http://127.0.0.1:{ports['mlflow']}/health"}
        assert all(requests.get(url, timeout=5).ok for url in urls)
        assert f"Prefect UI : http://127.0.0.1:{ports['prefect']}" in "".join(lines)
        ui.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = ui.communicate(timeout=60)
    finally:
        if ui.poll() is None:
            ui.kill()
    assert ui.returncode == 0 and "stopped Prefect and MLflow servers" in output
    for url in urls:
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=5)


@pytest.mark.parametrize(
    "url, problem",
    [
        ("mysql://alice:s3cret@127.0.0.1/db", "--database must be a postgresql://"),
        (
            "postgresql://alice:s3cret@127.0.0.1:{port}",
            "--database holds a password, which `ps` shows to every user: drop it from the URL and set PGPASSWORD",
        ),
        ("postgresql://alice:@127.0.0.1:{port}", "--database holds a password"),  # an empty one too
        ("postgresql://alice@127.0.0.1:{port}/postgres?sslmode=disable", "--database takes no query parameters"),
        ("postgresql://alice@127.0.0.1:{port}", "cannot connect to PostgreSQL at 127.0.0.1:{port} as alice: "),
    ],
)
def test_ui_database_errors_are_one_line_naming_the_problem_without_the_password(url, problem, tmp_path, capsys):
    from flows.cli import main

    port = free_port()  # nothing listens there
    assert main(["ui", "--database", url.format(port=port), "--store", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"preftune: {problem.format(port=port)}") and error.count("\n") == 1, error
    assert "s3cret" not in error
