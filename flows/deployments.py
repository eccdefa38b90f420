"""What `preftune deploy` registers: deployments/prefect.yaml, with each training deployment's
parameters resolved to its whole profile. Prefect's run form sends every field it shows; starting from
the class defaults it would replace the profile's values (an untouched "Custom run" of `smoke` trained
the real model under the real registry names), starting from the resolved profile it sends the profile
back, plus whatever the person changed. A profile edit therefore needs a `preftune deploy` again."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.config import build_config

PREFECT_FILE = Path(__file__).resolve().parent.parent / "deployments" / "prefect.yaml"


def resolved_prefect_file(target: Path, source: Path = PREFECT_FILE) -> Path:
    """A copy of `source` at `target` whose `config` parameters are the profiles they name, resolved."""
    spec = yaml.safe_load(source.read_text())
    for deployment in spec.get("deployments", []):
        config = (deployment.get("parameters") or {}).get("config")
        if config is not None:
            deployment["parameters"]["config"] = build_config(dict(config)).model_dump(mode="json")
    target.write_text(yaml.safe_dump(spec, sort_keys=False))
    return target
