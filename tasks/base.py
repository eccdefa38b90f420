"""Shared building blocks for the stage settings and the run directory layout."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainSerializer


class StrictModel(BaseModel):
    """Settings reject unknown keys, so a typo in a profile fails with the key's name."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PreftuneError(Exception):
    """An error the user can fix (bad input, bad config): shown as one message, never retried. Its message
    is redacted as it is made: it names settings and sources that may carry a credential, and Prefect keeps
    it (the failed state's message, the failure record of a task that persists its result)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))


def free_port() -> int:
    """A loopback port nothing listens on now (for a launcher's rendezvous or a server)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cache_root() -> Path:
    """Where converted models live; shared by every run so a conversion happens once."""
    return Path(os.environ.get("PREFTUNE_CACHE_DIR", Path.home() / ".cache" / "preftune"))


def _plain(obj: object) -> object:
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else str(obj)


def fingerprint(obj: object) -> str:
    """A short stable hash of settings and results, used to name stage and cache folders."""
    payload = json.dumps(obj, sort_keys=True, default=_plain).encode()
    return hashlib.sha256(payload).hexdigest()[:10]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry condition: transient failures retry, a user's bad input or config does not."""
    try:
        state.result()
    except PreftuneError:
        return False
    except Exception:
        return True
    return True


class Workspace(BaseModel):
    """A run's folder (`runs/<run-name>/<stage>/`). Its token is made when the folder is, and is
    part of every cached task's inputs: delete the folder and the cached stages re-run."""

    path: str
    token: str

    @classmethod
    def open(cls, path: Path) -> Workspace:
        if path.is_symlink():  # a run folder that is a link would write wherever it points
            raise PreftuneError(f"the run folder {path} is a symbolic link: choose another run_name or remove the link")
        path.mkdir(parents=True, exist_ok=True)
        token_file = path / ".workspace-token"
        if not token_file.exists():
            token_file.write_text(uuid.uuid4().hex)
        return cls(path=str(path.resolve()), token=token_file.read_text().strip())

    def stage(self, name: str, *inputs: object) -> Path:
        """`<run>/<stage>/<hash of the stage's inputs>/`: changed settings or data get a fresh folder
        (and checkpoints), unchanged ones find their finished work again."""
        folder = Path(self.path) / name
        return folder / fingerprint(inputs) if inputs else folder


_SECRET_NAME = r"[\w.-]*(?:token|secret|password|passwd|pwd|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)"
SECRETS = [
    # PEM private keys, whole blocks
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S), "***"),
    (re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@"), r"\g<scheme>***@"),  # [user]:password@
    (re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]{16,}@"), r"\g<scheme>***@"),  # token@
    (
        re.compile(
            r"(?i)(?P<key>[?&;][\w-]*(?:token|key|password|passwd|secret|sig|signature|credential)[\w-]*=)[^&\s#]+"
        ),
        r"\g<key>***",
    ),  # in a query string
    (
        re.compile(
            r"(?i)(?P<key>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic|token)\s+)?[^\s,;\"']+"
        ),
        r"\g<key>***",
    ),  # Authorization: Bearer ...
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"), "Bearer ***"),
    (
        re.compile(rf"(?i)(?P<key>\b{_SECRET_NAME}[\"']?\s*[:=]\s*)(?P<quote>[\"']?)[^\s&#\"',;]+"),
        r"\g<key>\g<quote>***",
    ),  # HF_TOKEN=..., AWS_SECRET_ACCESS_KEY=..., password: ...
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), "***"),  # JWTs
    (re.compile(r"\b(?:hf|ghp|gho|ghs|ghu|ghr|github_pat|pnu|glpat|xox[abpors])[_-][A-Za-z0-9_-]{16,}"), "***"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "***"),  # OpenAI-style keys (sk-..., sk-proj-...)
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "***"),  # AWS access key ids
]


def redact(text: str) -> str:
    """Credentials (in URIs, query strings, `NAME=value` settings, HTTP headers, JWTs, PEM keys and the
    well-known token shapes) become `***` before anything is logged, tagged, stored or printed."""
    for pattern, replacement in SECRETS:
        text = pattern.sub(replacement, text)
    return text


# A setting that may carry a credential (a URI's password, a signed URL's signature). Its JSON form is redacted:
# that is what Prefect records as a flow run's parameters and shows in its UI, what a deployment file and the
# launcher's spec hold, and what cache keys hash. The process itself keeps the value it was given.
MayHoldCredentials = Annotated[str, PlainSerializer(redact, return_type=str, when_used="json")]


def redacted_settings(values: object, key: str = "") -> list[str]:
    """Dotted keys of the settings whose value is a redacted credential (`***`): such a value came from a
    record (Prefect's parameters, a deployment file), never from a person, and must not be used."""
    if isinstance(values, dict):
        return [found for name, value in values.items() for found in redacted_settings(value, f"{key}{name}.")]
    if isinstance(values, (list, tuple)):
        return [found for index, value in enumerate(values) for found in redacted_settings(value, f"{key}{index}.")]
    return [key.rstrip(".")] if isinstance(values, str) and "***" in values else []


def redacted_credential_message(keys: list[str]) -> str:
    return (
        f"{', '.join(keys)}: a redacted credential (***), as Prefect records a flow run's parameters; credentials "
        "never travel as parameters: give them to the process that runs the flow through its environment (e.g. "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, HF_TOKEN, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    )


def redact_logs() -> None:
    """Redact every log record as it is made (any logger, any handler: Prefect's API log shipping too)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts", False):
        return

    def redacting(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        message = record.getMessage()
        shown = redact(message)
        if shown != message:
            record.msg, record.args = shown, ()
        return record

    redacting.redacts = True
    logging.setLogRecordFactory(redacting)
