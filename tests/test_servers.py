"""The servers `preftune ui --auth --artifacts-destination s3://...` starts, as it starts them: a page
on another origin cannot drive the Prefect API, neither server answers without its login, the clients
log in from the environment, and MLflow keeps the artifacts it serves in a real S3-compatible server
on loopback (s3rver: objects on disk, the S3 REST API over HTTP; `make s3rver` installs it)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import boto3
import mlflow
import pytest
import requests
from prefect import get_client
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from flows.servers import ServerSecrets, local_stores, start_servers
from tasks.base import PreftuneError, free_port

REPO = Path(__file__).resolve().parent.parent
S3RVER = REPO / ".venv" / "s3rver" / "node_modules" / ".bin" / "s3rver"
BUCKET, S3_KEYS = "preftune-artifacts", {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER"}  # s3rver's
ELSEWHERE = "http://attacker.example"  # a page the user has open in the same browser


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """s3rver on a free loopback port with one bucket; yields its endpoint and its data folder."""
    if not S3RVER.exists():
        pytest.fail(f"{S3RVER.relative_to(REPO)} is missing: `make s3rver` installs it (npm), as make test does")
    data, port = tmp_path_factory.mktemp("s3"), free_port()
    server = subprocess.Popen(
        [str(S3RVER), "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "--silent", "--configure-bucket", BUCKET],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)):
            assert server.poll() is None and time.monotonic() < deadline, "s3rver did not start"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", data
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, s3):
    """Both servers with auth on and MLflow's artifacts in the bucket; yields them and their secrets."""
    endpoint, _ = s3
    root = tmp_path_factory.mktemp("servers")
    secrets_ = ServerSecrets(
        PREFECT_API_AUTH_STRING=f"team:{secrets.token_urlsafe(12)}",
        MLFLOW_TRACKING_USERNAME="admin",
        MLFLOW_TRACKING_PASSWORD=secrets.token_urlsafe(12),
    )
    stores = local_stores(root / "store", f"s3://{BUCKET}/mlflow")
    prefect, mlflow_server = start_servers(
        free_port(),
        free_port(),
        stores,
        root,
        {"PREFECT_HOME": str(root / "home")},
        secrets_,
        auth=True,
        mlflow_env={"MLFLOW_S3_ENDPOINT_URL": endpoint} | S3_KEYS,
        mlflow_workers=1,
    )
    try:
        yield prefect, mlflow_server, secrets_
    finally:
        prefect.stop()
        mlflow_server.stop()


def _login(value) -> tuple[str, str]:
    user, _, password = value.get_secret_value().partition(":")
    return user, password


def test_a_page_on_another_origin_cannot_use_the_prefect_api(servers):
    prefect, _, secrets_ = servers
    api = f"{prefect.url}/api/flow_runs/filter"
    # A fetch() with a JSON body is preflighted: refused for another origin, allowed for the UI's own.
    foreign = requests.options(api, headers={"Origin": ELSEWHERE, "Access-Control-Request-Method": "POST"})
    assert foreign.status_code == 400 and "access-control-allow-origin" not in foreign.headers
    own = requests.options(
        api,
        headers={
            "Origin": prefect.url,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert own.ok and own.headers["access-control-allow-origin"] == prefect.url
    # A form post is not preflighted and the browser would attach the login it remembers: CSRF refuses it.
    posted = requests.post(
        api,
        data="{}",
        headers={"Origin": ELSEWHERE, "Content-Type": "text/plain"},
        auth=_login(secrets_.prefect_auth_string),
    )
    assert posted.status_code == 403 and "CSRF" in posted.text


def test_each_server_refuses_requests_without_its_login(servers):
    prefect, mlflow_server, secrets_ = servers
    flow = f"{prefect.url}/api/flows/{uuid.uuid4()}"
    assert requests.get(flow).status_code == 401
    assert requests.get(flow, auth=("team", "wrong")).status_code == 401
    assert requests.get(flow, auth=_login(secrets_.prefect_auth_string)).status_code == 404  # in, and no such flow

    search = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    admin = (secrets_.mlflow_username, secrets_.mlflow_password.get_secret_value())
    assert requests.get(search).status_code == 401
    assert requests.get(search, auth=(admin[0], "wrong")).status_code == 401
    assert requests.get(search, auth=admin).ok
    # MLflow's own guard: a state change from another host's page is refused even with the login.
    create = requests.post(
        f"{mlflow_server.url}/api/2.0/mlflow/experiments/create",
        json={"name": "from-a-page"},
        auth=admin,
        headers={"Origin": ELSEWHERE},
    )
    assert create.status_code == 403
    # Probes need no login (the cluster's readiness checks call these).
    assert requests.get(prefect.health_url).ok and requests.get(mlflow_server.health_url).ok


def test_clients_log_in_from_the_environment_and_artifacts_land_in_s3(servers, s3, tmp_path, monkeypatch):
    prefect, mlflow_server, secrets_ = servers
    endpoint, data = s3

    async def create_flow():
        async with get_client() as client:  # fetches and sends Prefect's CSRF token itself
            return await client.create_flow_from_name("login-check")

    with temporary_settings(
        {
            PREFECT_API_URL: f"{prefect.url}/api",
            PREFECT_API_AUTH_STRING: secrets_.prefect_auth_string.get_secret_value(),
        }
    ):
        assert asyncio.run(create_flow())

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", secrets_.mlflow_username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets_.mlflow_password.get_secret_value())
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):  # what earlier tests' stores left set
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        mlflow.set_experiment("s3-artifacts")  # on this server: not the active experiment of another store
        (tmp_path / "note.txt").write_text("kept in the bucket")
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(tmp_path / "note.txt"))
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # the client went through the server
        back = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/note.txt", dst_path=str(tmp_path / "back"))
        assert Path(back).read_text() == "kept in the bucket"
    finally:
        mlflow.set_tracking_uri(None)
    bucket = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
    )
    keys = [item["Key"] for item in bucket.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/")["Contents"]]
    assert [key for key in keys if key.endswith(f"{run.info.run_id}/artifacts/note.txt")], keys
    assert any(path.name.startswith("note.txt") for path in (data / BUCKET / "mlflow").rglob("*"))  # on its disk


def test_auth_needs_its_secrets_from_the_environment_or_a_private_file(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    for name in (
        "PREFECT_API_AUTH_STRING",
        "PREFECT_SERVER_API_AUTH_STRING",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "PGPASSWORD",
    ):
        monkeypatch.delenv(name, raising=False)
    assert main(["ui", "--auth", "--store", str(tmp_path / "store")]) == 2
    assert capsys.readouterr().err.startswith(
        "preftune: --auth needs PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD"
    )

    path = tmp_path / "secrets.env"
    path.write_text(
        "PREFECT_API_AUTH_STRING=team:from-file\nMLFLOW_TRACKING_USERNAME=admin\n"
        "MLFLOW_TRACKING_PASSWORD=from-file\nPGPASSWORD=from-file\n"
    )
    path.chmod(0o644)
    with pytest.raises(PreftuneError, match="can be read by other users: chmod 600"):
        ServerSecrets.load(path)
    path.chmod(0o600)
    monkeypatch.setenv("PGPASSWORD", "from-env")  # the environment wins over the file
    loaded = ServerSecrets.load(path)
    loaded.require_auth()
    assert loaded.prefect_auth_string.get_secret_value() == "team:from-file"
    assert loaded.postgres_env() == {"PGPASSWORD": "from-env"}
    assert "from-file" not in repr(loaded)
