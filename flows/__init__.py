"""preftune flows: the pipeline's composition, its configuration and its command line."""
import os

# Defaults for the embedded stack; a user's environment wins. Prefect's temporary server can take
# longer than its default 20 s to start cold, and neither service should phone home.
for _name, _value in {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

# bitsandbytes warns at import on every CPU machine that an optional kernel package is absent.
import logging  # noqa: E402

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
