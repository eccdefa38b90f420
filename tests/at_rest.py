"""What "no secret at rest" looks for: planted credentials, and every place a run may leave them
(Prefect's persisted results and cache records, its database, the run's folders, the MLflow store)."""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

PASSWORD = "PLANTED-pw-81723"
SIGNATURE = "PLANTEDsig9034"
ENVIRONMENT = {
    "HF_TOKEN": "hf_PLANTEDtoken0123456789abcdef",
    "MLFLOW_TRACKING_USERNAME": "alice",
    "MLFLOW_TRACKING_PASSWORD": "PLANTED-mlflow-pw-5531",
    "AWS_SECRET_ACCESS_KEY": "PLANTED-aws-7713",
}
PLANTED = [
    PASSWORD,
    SIGNATURE,
    ENVIRONMENT["HF_TOKEN"],
    ENVIRONMENT["MLFLOW_TRACKING_PASSWORD"],
    ENVIRONMENT["AWS_SECRET_ACCESS_KEY"],
]


def _contents(path: Path, records: bool) -> list[bytes]:
    """A file's bytes; for Prefect's result storage also the serialized result inside (base64 in its JSON
    record, or the whole file for a bare one), where a pickle keeps strings in clear."""
    raw = path.read_bytes()
    if not records:
        return [raw]
    try:
        encoded = json.loads(raw).get("result")
    except (ValueError, AttributeError):
        encoded = raw
    try:
        return [raw, base64.b64decode(encoded)] if encoded else [raw]
    except (binascii.Error, TypeError, ValueError):
        return [raw]


def leaks(results: Path, *places: Path) -> dict[str, list[str]]:
    """Each file (under the folders) that holds a planted secret, with the secrets it holds."""
    found = {}
    for root in (results, *places):
        for path in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
            contents = _contents(path, records=root == results)
            if hits := [secret for secret in PLANTED if any(secret.encode() in data for data in contents)]:
                found[str(path)] = hits
    return found


def prefect_database() -> list[Path]:
    """The test server's SQLite database and its journal: flow run parameters, states, logs, artifacts."""
    database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().partition(":///")[2])
    assert database.is_file(), database
    return sorted(database.parent.glob(database.name + "*"))
