"""`preftune`: run the flow from a profile, list profiles, show a resolved config."""
from __future__ import annotations

import argparse
import json
import sys

from tasks.base import PreftuneError


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="quickstart", help="configs/<profile>.yaml (default: quickstart)")
    parser.add_argument("--config", help="a YAML file of settings applied over the profile")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set dpo.max_steps=5 (repeatable)")


def _print_summary(summary) -> None:
    print("\n=== preftune run finished ===")
    print(f"MLflow run id : {summary.mlflow_run_id}")
    print(f"tracking URI  : {summary.tracking_uri}")
    print(f"run folder    : {summary.run_dir}")
    for version in summary.registered:
        print(f"registered    : models:/{version.name}/{version.version} (alias @{version.alias})")
    gate = summary.promotion
    print(f"promotion     : {'champion' if gate.promoted and summary.registered else 'not promoted'} "
          f"(combined reward {gate.candidate_score:.3f} vs {gate.baseline} {gate.baseline_score:.3f})")
    for name, value in sorted(summary.metrics.items()):
        print(f"  {name:32s} {value:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preftune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _config_args(commands.add_parser("run", help="run the preference-tuning flow"))
    _config_args(commands.add_parser("config", help="print the resolved configuration as JSON"))
    commands.add_parser("profiles", help="list the profiles in configs/")
    args = parser.parse_args(argv)

    from flows.config import load_config, profile_names

    try:
        if args.command == "profiles":
            print("\n".join(profile_names()))
            return 0
        config = load_config(args.profile, args.config, args.overrides)
        if args.command == "config":
            print(json.dumps(config.model_dump(), indent=2))
            return 0
        from flows.preference_tuning import preference_tuning

        _print_summary(preference_tuning(config))
        return 0
    except PreftuneError as error:
        print(f"preftune: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
