"""Start and stop the real Prefect and MLflow servers on loopback, against the project's local stores.

Used by `preftune ui` and by the integration test. Each server runs in its own process group so that
stopping it also stops the workers it spawns (uvicorn, MLflow's gunicorn).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from tasks.base import PreftuneError

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


def start_prefect(port: int, log_path: Path | None = None, env: dict[str, str] | None = None) -> Server:
    process = _spawn([_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)], log_path,
                     {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true"} | (env or {}))
    url = f"http://{HOST}:{port}"
    return Server("Prefect", url, f"{url}/api/health", process)


def start_mlflow(port: int, store: Path, log_path: Path | None = None) -> Server:
    store.mkdir(parents=True, exist_ok=True)
    process = _spawn([_bin("mlflow"), "server", "--host", HOST, "--port", str(port),
                      "--backend-store-uri", f"sqlite:///{(store / 'mlflow.db').resolve()}",
                      "--artifacts-destination", (store / "artifacts").resolve().as_uri()], log_path,
                     {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://{HOST}:{port}"
    return Server("MLflow", url, f"{url}/health", process)
