"""`preftune`: run the flow, serve or deploy it, start the UIs, and use the registered models."""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.base import PreftuneError, redact_logs

REPO = Path(__file__).resolve().parent.parent


class HideUserErrorTracebacks(logging.Filter):
    """Prefect logs every failed task with its traceback; for bad input or config the CLI shows
    one message instead, since the traceback points into libraries, not at the problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PreftuneError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(HideUserErrorTracebacks())


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="quickstart", help="configs/<profile>.yaml (default: quickstart)")
    parser.add_argument("--config", help="a YAML file of settings applied over the profile")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set method=kto --set policy.max_steps=5 (repeatable)",
    )


def _positive(text: str) -> int:
    """A count of at least 1 (a concurrency limit of 0 would stop every training task)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _print_summary(summary) -> None:
    print("\n=== preftune run finished ===")
    print(f"MLflow run id : {summary.mlflow_run_id}")
    print(f"tracking URI  : {summary.tracking_uri}")
    print(f"run folder    : {summary.run_dir}")
    print(
        f"disk          : {summary.bytes_written / 2**20:.1f} MiB written by this run (run folder and local MLflow "
        "artifacts)"
    )
    for version in summary.registered:
        print(f"registered    : models:/{version.name}/{version.version} (alias @{version.alias})")
    print(f"promotion     : {summary.promotion.explanation().replace('**', '')}")
    if summary.outcome:
        print(f"outcome       : {summary.outcome.status}: {summary.outcome.message}")
    if summary.report_path:
        print(f"report        : {summary.report_path} (the benchmark per instruction kind, drift per model)")
    metrics = summary.metrics
    for name, value in sorted(metrics.items()):
        # The benchmark's and the control prompts' differences are in the promotion's table above.
        if name.endswith((".ci_low", ".ci_high")) or name.startswith(("benchmark.", "drift.")):
            continue
        interval = (
            f"  [{metrics[name + '.ci_low']:.3f}, {metrics[name + '.ci_high']:.3f}]"
            if name + ".ci_low" in metrics
            else ""
        )
        print(f"  {name:44s} {value:8.4f}{interval}")


def cmd_run(args) -> int:
    from flows.config import load_config
    from flows.preference_tuning import preference_tuning

    config = load_config(args.profile, args.config, args.overrides)
    _quiet_user_errors()
    redact_logs()
    _print_summary(preference_tuning(config))
    return 0


def cmd_plan(args) -> int:
    """The training plan of every training stage, as JSON, for this machine or a described GPU."""
    from flows.config import load_config
    from tasks.plan import DeviceSpec, plan_stage, shape_of
    from tasks.stages import training_stages

    config = load_config(args.profile, args.config, args.overrides)
    if args.gpu_memory_gib:
        device = DeviceSpec.described_gpu(args.gpu_memory_gib, args.bf16 is not False, args.gpu_name)
    elif args.bf16 is not None or args.gpu_name:
        raise PreftuneError("--bf16/--no-bf16 and --gpu-name describe a GPU: give its memory with --gpu-memory-gib")
    else:
        device = DeviceSpec.detect()
    shape = shape_of(config.model)
    plans = [
        plan_stage(
            stage.name,
            stage.kind,
            stage.settings,
            stage.model,
            shape if stage.model is config.model else shape_of(stage.model),
            device,
            config.plan,
            distributed=config.distributed,
        )
        for stage in training_stages(config)
    ]
    print(
        json.dumps(
            {
                "device": device.model_dump(),
                "model": {"base_model": config.model.base_model, "parameters": shape.parameters},
                "stages": {plan.stage: plan.model_dump() for plan in plans},
            },
            indent=2,
        )
    )
    return 0


def cmd_methods(args) -> int:
    """The preference methods: one row each, as tasks/methods.py defines them."""
    from tasks.methods import METHODS

    print(f"{'method':8s} {'trainer':38s} {'data':9s} {'reference':9s} {'online':6s} {'implicit reward':15s} defaults")
    for name, method in METHODS.items():
        print(
            f"{name:8s} {method.trainer:38s} {method.data:9s} {str(method.reference):9s} {str(method.online):6s} "
            f"{str(method.implicit_reward):15s} {method.defaults or ''}"
        )
    return 0


def cmd_evaluate(args) -> int:
    """Evaluate a policy against a reference on a preference file, as the flow's evaluate stage does."""
    from tasks.evaluate import evaluate_file
    from tasks.promotion import decide_promotion
    from tasks.settings.data import DataSettings
    from tasks.settings.evaluation import EvalSettings
    from tasks.settings.tracking import PromotionSettings, TrackingSettings
    from tasks.tracking import configure

    judges = {}
    for spec in args.judge:
        aspect, sep, model = spec.partition("=")
        if not sep or not aspect or not model:
            raise PreftuneError(f"--judge expects ASPECT=MODEL[@WEIGHT], got {spec!r}")
        head, _, tail = model.rpartition("@")  # models:/name@alias also has an "@": only a number is a weight
        weight = tail if head and tail.replace(".", "", 1).isdigit() else None
        judges[aspect] = (head if weight else model, float(weight or 1))
    configure(TrackingSettings())
    settings = EvalSettings(
        generation_prompts=args.generation_prompts,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        seed=args.seed,
    )
    result = evaluate_file(
        args.policy,
        args.reference,
        DataSettings(source=args.data, format=args.format),
        judges,
        settings,
        Path(args.runs_dir) / "evaluations",
    )
    print(f"MLflow run id : {result.mlflow_run_id}\nreport        : {result.report_path}")
    print(f"verdict       : {decide_promotion(result.gate, PromotionSettings()).explanation().replace('**', '')}")
    metrics = result.metrics
    for name, value in sorted(metrics.items()):
        if not name.endswith((".ci_low", ".ci_high")):
            interval = (
                f"  [{metrics[name + '.ci_low']:.3f}, {metrics[name + '.ci_high']:.3f}]"
                if name + ".ci_low" in metrics
                else ""
            )
            print(f"  {name:44s} {value:8.4f}{interval}")
    return 0


def cmd_gc(args) -> int:
    """Remove what no registered model version needs from the run folders."""
    from tasks.cleanup import collect_garbage
    from tasks.settings.tracking import TrackingSettings
    from tasks.tracking import configure

    configure(TrackingSettings())
    report = collect_garbage(Path(args.runs_dir), dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for folder in report.removed:
        print(f"{verb}: {folder}")
    print(
        f"{verb} {len(report.removed)} folders ({report.bytes_freed / 2**20:.1f} MiB); kept {len(report.kept)} "
        "that registered model versions point into"
    )
    return 0


def cmd_serve(args) -> int:
    """One process that schedules and runs the flow: no work pool or worker needed."""
    from flows.config import load_config
    from flows.preference_tuning import preference_tuning

    config = load_config(args.profile, args.config, args.overrides)
    preference_tuning.serve(
        name=args.name or f"{config.profile}-served",
        cron=args.cron,
        parameters={"config": config.model_dump(mode="json")},
        tags=[config.profile],
    )
    return 0


def cmd_deploy(args) -> int:
    """Register deployments/prefect.yaml with the Prefect server named by PREFECT_API_URL, creating
    the work pools it names first (`prefect deploy` refuses a deployment whose pool is missing) and the
    `gpu` tag's concurrency limit, so that training tasks at once never outnumber the GPUs."""
    from prefect.settings import PREFECT_API_URL

    from flows.cluster import deploy_environment
    from flows.deployments import resolved_prefect_file
    from flows.pools import GPU_TAG, ensure_gpu_limit, ensure_work_pools

    if not PREFECT_API_URL.value():
        raise PreftuneError(
            "PREFECT_API_URL is not set: start a server (preftune ui) and point at it, e.g. "
            "prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    for name in ensure_work_pools():
        print(f"created work pool {name}")
    slots, created = ensure_gpu_limit(args.gpu_slots)
    print(
        f"{'created' if created else 'kept the existing'} concurrency limit on tag {GPU_TAG!r}: {slots} training "
        f"task(s) at a time{'' if created else f' (change it: prefect concurrency-limit create {GPU_TAG} N)'}"
    )
    names = ["--all"] if not args.names else [f"--name={name}" for name in args.names]
    env = os.environ | {"PREFTUNE_HOME": os.environ.get("PREFTUNE_HOME", str(REPO))} | deploy_environment()
    with tempfile.TemporaryDirectory() as folder:  # the form then starts from each profile's own values
        prefect_file = resolved_prefect_file(Path(folder) / "prefect.yaml")
        command = [
            str(Path(sys.executable).parent / "prefect"),
            "--no-prompt",
            "deploy",
            *names,
            "--prefect-file",
            str(prefect_file),
        ]
        return subprocess.run(command, cwd=REPO, env=env).returncode


def cmd_ui(args) -> int:
    """Real Prefect and MLflow servers on loopback until Ctrl-C (or SIGTERM): on the local stores, or on
    PostgreSQL (`--database`) when several workers share them; with `--auth` both require a login."""
    from flows.servers import ServerSecrets, local_stores, postgres_stores, start_servers

    store = Path(args.store)
    secrets = ServerSecrets.load(Path(args.secrets_file) if args.secrets_file else None)
    if args.auth:
        secrets.require_auth()  # before any database is created
    stores = (
        postgres_stores(args.database, store, args.artifacts_destination, secrets, args.auth)
        if args.database
        else local_stores(store, args.artifacts_destination)
    )
    print("\n".join(stores.describe(args.auth)), flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logs = store / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers = []
    try:
        servers = start_servers(
            args.prefect_port,
            args.mlflow_port,
            stores,
            logs,
            secrets=secrets,
            auth=args.auth,
            mlflow_workers=args.mlflow_workers,
        )
        print(f"Prefect UI : {servers[0].url}   (API: {servers[0].url}/api)")
        print(f"MLflow UI  : {servers[1].url}")
        print(
            f"Point runs at them:\n  export PREFECT_API_URL={servers[0].url}/api MLFLOW_TRACKING_URI={servers[1].url}"
        )
        if args.auth:
            print(
                "  and log in: PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD as "
                "these servers were started with (the UIs ask for them)"
            )
        print(f"Logs in {logs}. Ctrl-C stops both.", flush=True)
        while all(server.process.poll() is None for server in servers):
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for server in servers:
            server.stop()
        print("stopped Prefect and MLflow servers")


def cmd_promote(args) -> int:
    """Promote a registered candidate on its recorded verdict: approved here (--approved-by, --reason), or
    waiting for a person's answer in the Prefect UI (`tracking.promotion.approval: person`)."""
    from flows.config import load_config
    from flows.promotion import promote_candidate

    if bool(args.approved_by) != bool(args.reason):
        raise PreftuneError("--approved-by and --reason go together: who approves, and why")
    tracking = load_config(args.profile, args.config, args.overrides).tracking
    outcome = promote_candidate(
        args.model or tracking.policy_model_name, args.version, tracking, args.approved_by, args.reason
    )
    print(f"{outcome.status}: {outcome.message}")
    return 0 if outcome.status == "promoted" else 1


def cmd_models(args) -> int:
    from tasks.registry import list_versions
    from tasks.settings.tracking import TrackingSettings
    from tasks.tracking import configure

    configure(TrackingSettings())
    rows = list_versions(args.prefix)
    if not rows:
        print("no registered models yet: run `preftune run` first")
    for row in rows:
        aliases = ",".join(f"@{a}" for a in row["aliases"]) or "-"
        metrics = "  ".join(f"{k}={v:.3f}" for k, v in row["metrics"].items())
        print(f"{row['name']:36s} v{row['version']:<4} {aliases:24s} run {row['run_id'][:8]}  {metrics}")
    return 0


def cmd_generate(args) -> int:
    from tasks.registry import generate
    from tasks.settings.tracking import TrackingSettings
    from tasks.tracking import configure

    configure(TrackingSettings())
    print(generate(args.model, args.prompt, args.max_new_tokens, args.system))
    return 0


def cmd_score(args) -> int:
    from tasks.registry import score
    from tasks.settings.tracking import TrackingSettings
    from tasks.tracking import configure

    configure(TrackingSettings())
    for answer, reward in zip(args.answer, score(args.judge, args.prompt, args.answer, args.max_length, args.system)):
        print(json.dumps({"answer": answer, "score": reward}))
    return 0


def main(argv: list[str] | None = None) -> int:
    # At exit, after every other atexit handler (MLflow's and Prefect's flushes among them), spare the
    # interpreter its last collection of the ML stack's objects (bench/RESULTS.md: "Measured choices").
    atexit.register(gc.freeze)
    parser = argparse.ArgumentParser(prog="preftune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the preference-tuning flow")
    _config_args(run)
    config = commands.add_parser("config", help="print the resolved configuration as JSON")
    _config_args(config)
    commands.add_parser("profiles", help="list the profiles in configs/")
    commands.add_parser("methods", help="list the preference methods (`--set method=NAME`)")
    plan = commands.add_parser("plan", help="print each training stage's plan (precision, batch, memory) as JSON")
    _config_args(plan)
    plan.add_argument("--gpu-memory-gib", type=float, help="plan for a described GPU with this much free memory")
    plan.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the described GPU supports bf16 (--no-bf16: fp16 only, e.g. T4, V100)",
    )
    plan.add_argument("--gpu-name", help="a name for the described GPU")
    evaluate = commands.add_parser("evaluate", help="evaluate a policy against a reference on a preference file")
    evaluate.add_argument("--policy", required=True, help="a model folder, hub id or models:/ URI")
    evaluate.add_argument("--reference", required=True, help="what the policy is compared with (e.g. its base)")
    evaluate.add_argument("--data", required=True, help="a preference file (jsonl/json/parquet/csv) or hub dataset id")
    evaluate.add_argument("--format", default="auto", help="the file's schema (default: detected)")
    evaluate.add_argument(
        "--judge",
        action="append",
        default=[],
        metavar="ASPECT=MODEL[@WEIGHT]",
        help="a sequence-classification reward model that judges one aspect (repeatable)",
    )
    evaluate.add_argument("--generation-prompts", type=int, default=32)
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--max-length", type=int, default=512)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--runs-dir", default="runs")
    collect = commands.add_parser("gc", help="remove run folders no registered model version needs")
    collect.add_argument("--runs-dir", default="runs")
    collect.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    serve = commands.add_parser("serve", help="serve the flow on a cron schedule from this process")
    _config_args(serve)
    serve.add_argument("--cron", default="0 2 * * *", help="schedule (default: 02:00 every day)")
    serve.add_argument("--name", help="deployment name (default: <profile>-served)")
    deploy = commands.add_parser("deploy", help="register deployments/prefect.yaml with a running Prefect server")
    deploy.add_argument("names", nargs="*", help="deployment names (default: all)")
    deploy.add_argument(
        "--gpu-slots",
        type=_positive,
        metavar="N",
        help="training tasks at a time, server-wide (the `gpu` tag's concurrency limit), when deploy "
        "creates the limit (default: this machine's GPUs, at least 1)",
    )
    ui = commands.add_parser("ui", help="start Prefect and MLflow servers on 127.0.0.1 until Ctrl-C")
    ui.add_argument("--prefect-port", type=int, default=4200)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.add_argument(
        "--mlflow-workers",
        type=_positive,
        metavar="N",
        help="MLflow server worker processes (default 4, MLflow's own; each takes seconds of CPU to start)",
    )
    ui.add_argument("--store", default=str(REPO / "mlflow"), help="the MLflow store to serve (default: mlflow/)")
    ui.add_argument(
        "--database",
        metavar="postgresql://USER@HOST[:PORT]",
        help="run both servers on this PostgreSQL server (databases preftune_prefect and preftune_mlflow, "
        "created when missing) instead of SQLite; the password from PGPASSWORD or ~/.pgpass, never "
        "the URL",
    )
    ui.add_argument(
        "--auth",
        action="store_true",
        help="require a login on both servers: Prefect's API auth string (PREFECT_API_AUTH_STRING=USER:PASSWORD) "
        "and MLflow's basic-auth app (admin MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)",
    )
    ui.add_argument(
        "--secrets-file",
        metavar="PATH",
        help="KEY=value lines (mode 600) for the variables above, PGPASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY; "
        "the environment wins",
    )
    ui.add_argument(
        "--artifacts-destination",
        metavar="PATH_OR_URI",
        help="where the MLflow server keeps the artifacts it serves, e.g. s3://bucket/preftune "
        "(default: <store>/artifacts)",
    )
    promote = commands.add_parser("promote", help="promote a registered candidate to champion on its recorded verdict")
    _config_args(promote)
    promote.add_argument("version", help="the registered version to promote")
    promote.add_argument("--model", help="the registered model (default: the profile's tracking.policy_model_name)")
    promote.add_argument(
        "--approved-by",
        help="who approves (with --reason); without: wait for a person in the "
        "Prefect UI when tracking.promotion.approval is person",
    )
    promote.add_argument("--reason", help="why, kept on the version")
    models = commands.add_parser("models", help="list registered model versions, aliases and metrics")
    models.add_argument("--prefix", default="preftune-")
    gen = commands.add_parser("generate", help="answer a prompt with a registered policy")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="models:/preftune-policy@champion")
    gen.add_argument("--max-new-tokens", type=int, help="default: the answer length it was evaluated with")
    gen.add_argument("--system", help="a system message before the prompt")
    judge = commands.add_parser("score", help="score answers to a prompt with a registered judge (reward model)")
    judge.add_argument("prompt")
    judge.add_argument("--answer", action="append", required=True, help="an answer to score (repeatable)")
    judge.add_argument(
        "--judge", default="models:/preftune-reward-helpfulness@candidate", help="a judge's models:/ URI (or a folder)"
    )
    judge.add_argument("--max-length", type=int, default=512, help="tokens per scored prompt and answer")
    judge.add_argument("--system", help="a system message before the prompt")
    args = parser.parse_args(argv)

    try:
        if args.command == "profiles":
            from flows.config import profile_names

            print("\n".join(profile_names()))
            return 0
        if args.command == "config":
            from flows.config import load_config

            print(json.dumps(load_config(args.profile, args.config, args.overrides).model_dump(), indent=2))
            return 0
        handler = {
            "run": cmd_run,
            "plan": cmd_plan,
            "methods": cmd_methods,
            "evaluate": cmd_evaluate,
            "gc": cmd_gc,
            "serve": cmd_serve,
            "deploy": cmd_deploy,
            "ui": cmd_ui,
            "promote": cmd_promote,
            "models": cmd_models,
            "generate": cmd_generate,
            "score": cmd_score,
        }[args.command]
        return handler(args)
    except PreftuneError as error:
        print(f"preftune: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
