"""Start and stop the real Prefect and MLflow servers on loopback, against the project's local stores
(SQLite) or, for servers that several machines share, PostgreSQL databases.

Used by `preftune ui` and by the integration tests. Each server runs in its own process group so that
stopping it also stops the workers it spawns (uvicorn, MLflow's gunicorn). Database URLs reach the
servers through their environment, never their command line (which `ps` shows to every user), and are
printed only through `redact`; passwords come from the environment or a secrets file, never argv.

A web page the user has open can send requests to loopback too: Prefect runs with CSRF protection on
and CORS limited to its own UI's origin; MLflow refuses state-changing requests from other hosts' pages
itself. `auth` adds a login to both: Prefect's API auth string (HTTP basic auth) and MLflow's
basic-auth app.
"""

from __future__ import annotations

import os
import secrets as token_source
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.base import PreftuneError, redact

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

HOST = "127.0.0.1"  # never bind beyond loopback by default


def own_origins(port: int) -> str:
    """The origins a server's own UI is opened at: the only pages allowed to call its API from a browser."""
    return f"http://{HOST}:{port},http://localhost:{port}"


class ServerSecrets(BaseSettings):
    """The servers' credentials, under the names the libraries themselves read, from the environment
    or a dotenv-style file (`KEY=value` lines; the environment wins). Never from the command line:
    `ps` shows every process's arguments to every user."""

    model_config = SettingsConfigDict(extra="ignore")

    prefect_auth_string: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"),
        description="Prefect's API auth string (`USER:PASSWORD`): the server accepts only requests that send it as "
        "HTTP basic auth; clients send it from PREFECT_API_AUTH_STRING and the UI asks for it",
    )
    mlflow_username: str | None = Field(
        None,
        validation_alias="MLFLOW_TRACKING_USERNAME",
        description="MLflow's admin user, created by the basic-auth app on its first start; clients log in with "
        "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD",
    )
    mlflow_password: SecretStr | None = Field(
        None,
        validation_alias="MLFLOW_TRACKING_PASSWORD",
        description="the admin user's password (used when the user is created; change it later in MLflow)",
    )
    mlflow_secret_key: SecretStr | None = Field(
        None,
        validation_alias="MLFLOW_FLASK_SERVER_SECRET_KEY",
        description="signs the MLflow UI's form tokens; a random one per start when unset (the UI's open forms "
        "then expire on restart)",
    )
    postgres_password: SecretStr | None = Field(
        None,
        validation_alias="PGPASSWORD",
        description="the PostgreSQL password for `--database` (libpq's variable; ~/.pgpass works too)",
    )

    @classmethod
    def load(cls, path: Path | None = None) -> ServerSecrets:
        """From the environment, and from `path` where given: a file only its owner can read, as
        libpq and ssh require of theirs."""
        if path is None:
            return cls()
        if not path.is_file():
            raise PreftuneError(f"secrets file {path} does not exist")
        if path.stat().st_mode & 0o077:
            raise PreftuneError(f"secrets file {path} can be read by other users: chmod 600 {path}")
        return cls(_env_file=path)

    def require_auth(self) -> None:
        missing = [
            name
            for name, value in (
                ("PREFECT_API_AUTH_STRING", self.prefect_auth_string),
                ("MLFLOW_TRACKING_USERNAME", self.mlflow_username),
                ("MLFLOW_TRACKING_PASSWORD", self.mlflow_password),
            )
            if not value
        ]
        if missing:
            raise PreftuneError(f"--auth needs {', '.join(missing)}: set them in the environment or the --secrets-file")

    def postgres_env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.postgres_password.get_secret_value()} if self.postgres_password else {}


@dataclass
class Server:
    name: str
    url: str
    health_url: str
    process: subprocess.Popen

    def wait_until_healthy(self, timeout_s: float = 180.0) -> None:
        """Health endpoints answer without a login on both servers (as Kubernetes probes need)."""
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


# Set only by preftune: inherited from the user's shell they would turn auth on behind `--auth`'s back.
_AUTH_VARIABLES = (
    "PREFECT_SERVER_API_AUTH_STRING",
    "MLFLOW_AUTH_CONFIG_PATH",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
)


def _spawn(command: list[str], log_path: Path | None, env: dict[str, str]) -> subprocess.Popen:
    output = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the server's, while it lives)
    inherited = {name: value for name, value in os.environ.items() if name not in _AUTH_VARIABLES}
    return subprocess.Popen(
        command, stdout=output, stderr=subprocess.STDOUT, env=inherited | env, start_new_session=True
    )


@dataclass(frozen=True)
class Stores:
    """Where the servers keep their state. `prefect_database` None is Prefect's own SQLite file under
    PREFECT_HOME; `mlflow_auth` is the basic-auth app's users database (used with auth on); `folder`
    is the local store folder (logs, the auth app's settings); `created` names the PostgreSQL
    databases this start had to create. No URL here carries a password."""

    prefect_database: str | None
    mlflow_backend: str
    artifacts: str
    mlflow_auth: str
    folder: Path
    created: tuple[str, ...] = ()

    def describe(self, auth: bool = False) -> list[str]:
        """What `preftune ui` prints: credentials redacted, new databases marked."""

        def line(label: str, uri: str) -> str:
            return f"{label} : {redact(uri)}" + (" (created)" if uri.rsplit("/", 1)[-1] in self.created else "")

        return [
            line("Prefect database", self.prefect_database or "SQLite under PREFECT_HOME"),
            line("MLflow database ", self.mlflow_backend),
            line("MLflow artifacts", self.artifacts) + " (served by the MLflow server)",
            line("MLflow users    ", self.mlflow_auth) if auth else "Login           : off (--auth turns it on)",
        ]


PREFECT_DATABASE, MLFLOW_DATABASE = "preftune_prefect", "preftune_mlflow"  # one each: both keep `alembic_version`
MLFLOW_AUTH_DATABASE = "preftune_mlflow_auth"  # the basic-auth app's users and permissions (its own migrations)
DATABASE_FORM = "postgresql://USER@HOST[:PORT][/DATABASE]"


def artifacts_uri(destination: str | None, store: Path) -> str:
    """MLflow serves artifacts from here (`mlflow-artifacts:` URIs), so workers need no shared disk.
    A plain path becomes a file URI; s3://, gs://... pass through."""
    if destination and "://" in destination:
        return destination
    return Path(destination).resolve().as_uri() if destination else (store / "artifacts").resolve().as_uri()


def local_stores(store: Path, artifacts_destination: str | None = None) -> Stores:
    """Today's single-machine setup: MLflow's SQLite files and artifacts in the store folder."""
    store.mkdir(parents=True, exist_ok=True)
    return Stores(
        None,
        f"sqlite:///{(store / 'mlflow.db').resolve()}",
        artifacts_uri(artifacts_destination, store),
        f"sqlite:///{(store / 'basic_auth.db').resolve()}",
        store,
    )


def parse_postgres_url(url: str) -> URL:
    """The server URL as SQLAlchemy parses it. A password in it is refused: it would sit in this
    process's argv, which `ps` shows to every user. Errors never echo the URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 (a non-numeric port only fails when read)
    except (ArgumentError, ValueError):
        raise PreftuneError(f"--database is not a URL of the form {DATABASE_FORM}") from None
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise PreftuneError(f"--database must be a {DATABASE_FORM} URL, not {parsed.get_backend_name()!r}")
    if parsed.password is not None:
        raise PreftuneError(
            "--database holds a password, which `ps` shows to every user: drop it from the URL and "
            "set PGPASSWORD in the environment or the --secrets-file (or use ~/.pgpass)"
        )
    if not parsed.host:
        raise PreftuneError(f"--database names no host: expected {DATABASE_FORM}")
    if parsed.query:
        raise PreftuneError(
            "--database takes no query parameters: set TLS and the like through libpq's environment "
            "(e.g. PGSSLMODE=require), which both servers honour"
        )
    return parsed.set(drivername="postgresql", port=parsed.port or 5432)


def ensure_databases(server: URL, names: tuple[str, ...], password: str | None = None) -> tuple[str, ...]:
    """Create the databases the servers need where missing (their tables they create themselves), and
    say which were created. Connects to the URL's own database, `postgres` by default; without
    `password` libpq finds one itself (PGPASSWORD, ~/.pgpass)."""
    import psycopg2
    from psycopg2 import sql

    where, user = f"{server.host}:{server.port}", server.username or "the login user"
    try:
        connection = psycopg2.connect(
            host=server.host,
            port=server.port,
            user=server.username,
            password=password,
            dbname=server.database or "postgres",
            connect_timeout=10,
        )
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
                    raise PreftuneError(
                        f"{user} may not create database {name!r} on {where}: create it for "
                        "that user, or grant the user CREATEDB"
                    ) from None
                created.append(name)
    finally:
        connection.close()
    return tuple(created)


def postgres_stores(
    url: str,
    store: Path,
    artifacts_destination: str | None = None,
    secrets: ServerSecrets | None = None,
    auth: bool = False,
) -> Stores:
    """Both servers on one PostgreSQL server, each in its own database (created when missing), and
    with `auth` the MLflow users in a third. The password reaches each server as PGPASSWORD."""
    server = parse_postgres_url(url)
    store.mkdir(parents=True, exist_ok=True)
    password = secrets.postgres_password.get_secret_value() if secrets and secrets.postgres_password else None
    names = (PREFECT_DATABASE, MLFLOW_DATABASE) + ((MLFLOW_AUTH_DATABASE,) if auth else ())
    created = ensure_databases(server, names, password)
    # Drivers named: Prefect's server is async (asyncpg); SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3.
    prefect, mlflow, mlflow_auth = (
        server.set(drivername=driver, database=name).render_as_string()
        for driver, name in (
            ("postgresql+asyncpg", PREFECT_DATABASE),
            ("postgresql+psycopg2", MLFLOW_DATABASE),
            ("postgresql+psycopg2", MLFLOW_AUTH_DATABASE),
        )
    )
    return Stores(prefect, mlflow, artifacts_uri(artifacts_destination, store), mlflow_auth, store, created)


def start_prefect(
    port: int,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    database: str | None = None,
    auth_string: str | None = None,
) -> Server:
    """`database`: a postgresql+asyncpg:// URL; Prefect creates its tables there on start. CSRF
    protection is on (Prefect's clients and UI fetch the token themselves) and CORS admits the UI's
    own origin only, so another page in the user's browser cannot start or change runs."""
    security = {
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": own_origins(port),
    }
    database_env = {"PREFECT_SERVER_DATABASE_CONNECTION_URL": database} if database else {}
    # The client's variable too: the server's own processes then reach its API as any client does.
    auth_env = (
        {"PREFECT_SERVER_API_AUTH_STRING": auth_string, "PREFECT_API_AUTH_STRING": auth_string} if auth_string else {}
    )
    process = _spawn(
        [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)],
        log_path,
        # the UI's calls go to this server's API, on whatever port it was given
        {
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api",
        }
        | database_env
        | (env or {})
        | security
        | auth_env,
    )
    url = f"http://{HOST}:{port}"
    return Server("Prefect", url, f"{url}/api/health", process)


def write_mlflow_auth_config(path: Path, database_uri: str) -> Path:
    """The basic-auth app's settings file (MLFLOW_AUTH_CONFIG_PATH): MLflow reads the users database
    from nowhere else. Logged-in users may read everything and change what they create; the admin
    login comes through the environment. Owner-only, since a cluster's URL carries a password; `%`
    doubled, as configparser would read a percent-encoded password as interpolation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {database_uri.replace('%', '%%')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def _mlflow_auth_env(stores: Stores, secrets: ServerSecrets, config_path: Path) -> dict[str, str]:
    write_mlflow_auth_config(config_path, stores.mlflow_auth)
    key = secrets.mlflow_secret_key.get_secret_value() if secrets.mlflow_secret_key else token_source.token_hex(32)
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config_path),
        "MLFLOW_AUTH_ADMIN_USERNAME": secrets.mlflow_username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.mlflow_password.get_secret_value(),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": key,
    }


def start_mlflow(
    port: int,
    store: Path | None,
    log_path: Path | None = None,
    stores: Stores | None = None,
    secrets: ServerSecrets | None = None,
    auth: bool = False,
    env: dict[str, str] | None = None,
    workers: int | None = None,
) -> Server:
    """Serves `stores` (default: the SQLite store in the folder `store`) and their artifacts, with
    MLflow's basic-auth app when `auth` (admin login from `secrets`), on `workers` processes (default:
    MLflow's, 4; each takes seconds of CPU to start). MLflow's own guard refuses state-changing requests
    from pages on other hosts; it always admits localhost origins."""
    stores = stores or local_stores(store)
    command = [
        _bin("mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--artifacts-destination",
        stores.artifacts,
    ] + (["--workers", str(workers)] if workers else [])
    server_env = {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_BACKEND_STORE_URI": stores.mlflow_backend,
    }  # = --backend-store-uri, out of `ps`
    secrets = secrets or ServerSecrets()
    if auth:
        secrets.require_auth()
        command += ["--app-name", "basic-auth"]
        server_env |= _mlflow_auth_env(stores, secrets, stores.folder / "basic_auth.ini")
    process = _spawn(command, log_path, server_env | secrets.postgres_env() | (env or {}))
    url = f"http://{HOST}:{port}"
    return Server("MLflow", url, f"{url}/health", process)


def start_servers(
    prefect_port: int,
    mlflow_port: int,
    stores: Stores,
    logs: Path | None = None,
    prefect_env: dict[str, str] | None = None,
    secrets: ServerSecrets | None = None,
    auth: bool = False,
    mlflow_env: dict[str, str] | None = None,
    mlflow_workers: int | None = None,
) -> list[Server]:
    """Prefect and MLflow on `stores`, healthy when this returns (both stopped if either fails).
    `auth`: both require a login, from `secrets`; `mlflow_env`: e.g. the artifact store's credentials."""
    secrets = secrets or ServerSecrets()
    if auth:
        secrets.require_auth()
    auth_string = secrets.prefect_auth_string.get_secret_value() if auth else None
    servers = [
        start_prefect(
            prefect_port,
            logs and logs / "prefect-server.log",
            secrets.postgres_env() | (prefect_env or {}),
            stores.prefect_database,
            auth_string,
        )
    ]
    try:
        servers.append(
            start_mlflow(
                mlflow_port,
                None,
                logs and logs / "mlflow-server.log",
                stores,
                secrets,
                auth,
                mlflow_env,
                mlflow_workers,
            )
        )
        for server in servers:
            server.wait_until_healthy()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.servers mlflow-auth-config PATH`: the cluster's MLflow pod writes its auth
    settings from MLFLOW_AUTH_DATABASE_URI (a Secret) before the server starts."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.servers")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("mlflow-auth-config", help="write MLflow's basic-auth settings file").add_argument("path")
    args = parser.parse_args(argv)
    database_uri = os.environ.get("MLFLOW_AUTH_DATABASE_URI")
    if not database_uri:
        print("MLFLOW_AUTH_DATABASE_URI is not set: the basic-auth app's users database", file=sys.stderr)
        return 2
    print(f"wrote {write_mlflow_auth_config(Path(args.path), database_uri)} ({redact(database_uri)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
