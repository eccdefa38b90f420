"""Start and stop the real Prefect and MLflow servers on loopback, against the project's local stores
(SQLite) or, for servers that several machines share, two PostgreSQL databases.

Used by `preftune ui` and by the integration test. Each server runs in its own process group so that
stopping it also stops the workers it spawns (uvicorn, MLflow's gunicorn). Database URLs reach the
servers through their environment, never their command line (which `ps` shows to every user), and are
printed only through `redact`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from tasks.base import PreftuneError, redact

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

HOST = "127.0.0.1"  # never bind beyond loopback by default


@dataclass
class Server:
    name: str
    url: str
    health_url: str
    process: subprocess.Popen

    def wait_until_healthy(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PreftuneError(f"{self.name} server exited with code {self.process.returncode}")
            try:
                if requests.get(self.health_url, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise PreftuneError(f"{self.name} server did not answer at {self.health_url} within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _spawn(command: list[str], log_path: Path | None, env: dict[str, str]) -> subprocess.Popen:
    output = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=os.environ | env,
                            start_new_session=True)


@dataclass(frozen=True)
class Stores:
    """Where the servers keep their state. `prefect_database` None is Prefect's own SQLite file under
    PREFECT_HOME; `created` names the PostgreSQL databases this start had to create."""

    prefect_database: str | None
    mlflow_backend: str
    artifacts: str
    created: tuple[str, ...] = ()

    def describe(self) -> list[str]:
        """What `preftune ui` prints: credentials redacted, new databases marked."""
        def line(label: str, uri: str) -> str:
            return f"{label} : {redact(uri)}" + (" (created)" if uri.rsplit("/", 1)[-1] in self.created else "")

        return [line("Prefect database", self.prefect_database or "SQLite under PREFECT_HOME"),
                line("MLflow database ", self.mlflow_backend),
                line("MLflow artifacts", self.artifacts) + " (served by the MLflow server)"]


PREFECT_DATABASE, MLFLOW_DATABASE = "preftune_prefect", "preftune_mlflow"  # one each: both keep `alembic_version`
DATABASE_FORM = "postgresql://USER[:PASSWORD]@HOST[:PORT][/DATABASE]"


def artifacts_uri(destination: str | None, store: Path) -> str:
    """MLflow serves artifacts from here (`mlflow-artifacts:` URIs), so workers need no shared disk.
    A plain path becomes a file URI; s3://, gs://... pass through."""
    if destination and "://" in destination:
        return destination
    return Path(destination).resolve().as_uri() if destination else (store / "artifacts").resolve().as_uri()


def local_stores(store: Path, artifacts_destination: str | None = None) -> Stores:
    """Today's single-machine setup: MLflow's SQLite file and artifacts in the store folder."""
    store.mkdir(parents=True, exist_ok=True)
    return Stores(None, f"sqlite:///{(store / 'mlflow.db').resolve()}", artifacts_uri(artifacts_destination, store))


def parse_postgres_url(url: str) -> URL:
    """The server URL as SQLAlchemy parses it (percent-encoded passwords included). Errors never echo
    the URL: it may hold a password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 (a non-numeric port only fails when read)
    except (ArgumentError, ValueError):
        raise PreftuneError(f"--database is not a URL of the form {DATABASE_FORM}") from None
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise PreftuneError(f"--database must be a {DATABASE_FORM} URL, not {parsed.get_backend_name()!r}")
    if not parsed.host:
        raise PreftuneError(f"--database names no host: expected {DATABASE_FORM}")
    if parsed.query:
        raise PreftuneError("--database takes no query parameters: set TLS and the like through libpq's environment "
                            "(e.g. PGSSLMODE=require), which both servers honour")
    return parsed.set(drivername="postgresql", port=parsed.port or 5432)


def ensure_databases(server: URL, names: tuple[str, ...]) -> tuple[str, ...]:
    """Create the databases the servers need where missing (their tables they create themselves), and
    say which were created. Connects to the URL's own database, `postgres` by default."""
    import psycopg2
    from psycopg2 import sql

    where, user = f"{server.host}:{server.port}", server.username or "the login user"
    try:
        connection = psycopg2.connect(host=server.host, port=server.port, user=server.username,
                                      password=server.password, dbname=server.database or "postgres",
                                      connect_timeout=10)
    except psycopg2.OperationalError as error:
        reason = redact(str(error).strip().splitlines()[0])
        raise PreftuneError(f"cannot connect to PostgreSQL at {where} as {user}: {reason}") from None
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    created = []
    try:
        with connection.cursor() as cursor:
            for name in names:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone():
                    continue
                try:
                    cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                except psycopg2.errors.InsufficientPrivilege:
                    raise PreftuneError(f"{user} may not create database {name!r} on {where}: create it for "
                                        "that user, or grant the user CREATEDB") from None
                created.append(name)
    finally:
        connection.close()
    return tuple(created)


def postgres_stores(url: str, store: Path, artifacts_destination: str | None = None) -> Stores:
    """Both servers on one PostgreSQL server, each in its own database (created when missing)."""
    server = parse_postgres_url(url)
    created = ensure_databases(server, (PREFECT_DATABASE, MLFLOW_DATABASE))
    # Drivers named: Prefect's server is async (asyncpg); SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3.
    prefect, mlflow = (server.set(drivername=driver, database=name).render_as_string(hide_password=False)
                       for driver, name in (("postgresql+asyncpg", PREFECT_DATABASE),
                                            ("postgresql+psycopg2", MLFLOW_DATABASE)))
    return Stores(prefect, mlflow, artifacts_uri(artifacts_destination, store), created)


def start_prefect(port: int, log_path: Path | None = None, env: dict[str, str] | None = None,
                  database: str | None = None) -> Server:
    """`database`: a postgresql+asyncpg:// URL; Prefect creates its tables there on start."""
    database_env = {"PREFECT_SERVER_DATABASE_CONNECTION_URL": database} if database else {}
    process = _spawn([_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)], log_path,
                     {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true"} | database_env
                     | (env or {}))
    url = f"http://{HOST}:{port}"
    return Server("Prefect", url, f"{url}/api/health", process)


def start_mlflow(port: int, store: Path | None, log_path: Path | None = None, stores: Stores | None = None) -> Server:
    """Serves `stores` (default: the SQLite store in the folder `store`) and their artifacts."""
    stores = stores or local_stores(store)
    process = _spawn([_bin("mlflow"), "server", "--host", HOST, "--port", str(port),
                      "--artifacts-destination", stores.artifacts], log_path,
                     {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                      "MLFLOW_BACKEND_STORE_URI": stores.mlflow_backend})  # = --backend-store-uri, out of `ps`
    url = f"http://{HOST}:{port}"
    return Server("MLflow", url, f"{url}/health", process)


def start_servers(prefect_port: int, mlflow_port: int, stores: Stores, logs: Path | None = None,
                  prefect_env: dict[str, str] | None = None) -> list[Server]:
    """Prefect and MLflow on `stores`, healthy when this returns (both stopped if either fails)."""
    servers = [start_prefect(prefect_port, logs and logs / "prefect-server.log", prefect_env, stores.prefect_database),
               start_mlflow(mlflow_port, None, logs and logs / "mlflow-server.log", stores)]
    try:
        for server in servers:
            server.wait_until_healthy()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
