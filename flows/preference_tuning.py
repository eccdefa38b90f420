"""The preference-tuning flow: data -> reward models -> (SFT) -> policy -> merge -> evaluate -> register.

The policy stage trains whichever preference method the config names (tasks/methods.py); this flow
names none. Online methods score their generations with the reward models trained just before.

The flow only chains tasks and opens the MLflow parent run; each task opens its own nested run.
Tasks pass small typed results (paths, hashes, metrics), and finished stages are cached by Prefect
under the run's workspace, so a re-run with the same settings resumes where the last one stopped.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.config import PipelineConfig
from tasks.base import Workspace, fingerprint, redact, redact_logs
from tasks.cleanup import stored_bytes
from tasks.cuda_required import require_cuda_if_asked
from tasks.data import (DataSettings, LoadedData, SplitData, filter_preferences, format_preferences,
                        load_preferences, read_jsonl, render_example, split_preferences)
from tasks.distributed import DevicePool
from tasks.evaluate import EvalSettings, Judge, evaluate
from tasks.merge import merge_adapters
from tasks.methods import method_named
from tasks.models import ResolvedModel, resolve_base_model
from tasks.plan import TrainingPlan, plan_training, publish_plans
from tasks.policy import RewardFunction, train_policy
from tasks.reward import RewardResult, RewardSettings, train_reward
from tasks.sft import prepare_chat_data, train_sft
from tasks.tracking import (PromotionDecision, RegisteredVersion, configure, current_champion, decide_promotion,
                            git_commit, register)


class PipelineSummary(BaseModel):
    mlflow_run_id: str
    tracking_uri: str
    run_dir: str
    bytes_written: int
    metrics: dict[str, float]
    promotion: PromotionDecision
    registered: list[RegisteredVersion]


def _flatten(values: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{name}.")
        else:
            flat[name] = redact(str(value))
    return flat


def prepare_data(settings: DataSettings, model: ResolvedModel, max_length: int, workspace: Workspace,
                 stage: str) -> tuple[LoadedData, SplitData, SplitData]:
    """load -> filter -> split -> format for one data source, with its counts on the parent run.
    Returns the loaded file, the raw splits (for other consumers) and the splits formatted for training."""
    loaded = load_preferences(settings, workspace, stage)
    filtered = filter_preferences(loaded, settings, workspace, stage)
    splits = split_preferences(filtered, settings, workspace, stage)
    formatted = format_preferences(splits, model, max_length, settings, workspace, stage)
    mlflow.set_tag(f"{stage}.sha256", loaded.sha256)
    parts = {"train": formatted.train, "eval": formatted.eval} | ({"judge": splits.judge} if splits.judge else {})
    mlflow.log_metrics({f"{stage}.rows_loaded": loaded.rows, f"{stage}.rows_kept": filtered.rows,
                        f"{stage}.shared_questions": splits.shared_questions}
                       | {f"{stage}.rows_{name}": part.rows for name, part in parts.items()}
                       | {f"{stage}.dropped.{rule}": count for rule, count in filtered.dropped.items()}
                       | {f"{stage}.overlong_{split}": count for split, count in formatted.overlong.items()}
                       | {f"{stage}.answers_cut_{split}": count for split, count in formatted.truncated_answers.items()})
    mlflow.log_text(render_example(formatted.train.path, model.tokenizer()), f"data/{stage}-example.txt")
    for name, part in parts.items():
        mlflow.log_input(mlflow.data.from_pandas(read_jsonl(part.path), source=redact(loaded.source),
                                                name=f"{stage}-{name}"),
                         context=name)
    create_table_artifact(
        key=f"{stage}-filter",
        table=[{"rule": rule, "dropped": count} for rule, count in filtered.dropped.items()],
        description=f"{redact(loaded.source)}: {filtered.rows_in} rows in, {filtered.rows} kept after the recipe filter; "
                    f"split by question: {' / '.join(f'{n} {p.rows}' for n, p in parts.items())}",
    )
    return loaded, splits, formatted


class Aspect(BaseModel):
    """One reward aspect, ready to train (or given): its model, its pairs, its plan."""

    name: str
    settings: RewardSettings
    model: ResolvedModel
    pairs: SplitData
    provenance: str
    plan: TrainingPlan | None = None


def prepare_aspect(name: str, settings: RewardSettings, config: PipelineConfig, policy_model: ResolvedModel,
                   raw: SplitData, pairs: SplitData, workspace: Workspace) -> Aspect:
    """A judge's data: its own source, or the pipeline's questions set aside for judges (never the
    policy's), formatted for its own max_length so its trainer drops nothing."""
    model = resolve_base_model(settings.model) if settings.model else policy_model
    if settings.judge:
        own = prepare_data(settings.data, model, settings.max_length, workspace, f"data-{name}")[2] \
            if settings.data else pairs
        return Aspect(name=name, settings=settings, model=model, pairs=own, provenance=f"given: {redact(settings.judge)}")
    if settings.data is None:
        judged = format_preferences(raw.for_judges(), model, settings.max_length, config.data, workspace,
                                    f"data-judge-{name}")
        provenance = f"trained on {judged.train.rows} pairs whose questions the policy never saw"
    else:
        judged = prepare_data(settings.data, model, settings.max_length, workspace, f"data-{name}")[2]
        provenance = f"trained on {judged.train.rows} pairs of its own data ({Path(settings.data.source).name})"
    plan = plan_training(f"reward-{name}", "reward", settings, model, config.plan, judged.train.rows, config.distributed)
    return Aspect(name=name, settings=settings, model=model, pairs=judged, provenance=provenance, plan=plan)


def results(futures: dict) -> dict:
    """The submitted tasks' results by name, waiting for those still running."""
    return {name: future.result() for name, future in futures.items()}


def judges_of(aspects: list[Aspect], trained: dict[str, RewardResult], training_reward: bool = False) -> list[Judge]:
    """Each aspect's judge: the reward model trained for it, or the one it was given. `training_reward`:
    the policy is trained against them (online methods), so they cannot certify it."""
    judges = []
    for aspect in aspects:
        if reward := trained.get(aspect.name):
            judges.append(Judge(aspect=aspect.name, weight=reward.weight, model=reward.model_dir,
                                eval_path=reward.eval_path, provenance=aspect.provenance, training_reward=training_reward))
        else:
            judges.append(Judge(aspect=aspect.name, weight=aspect.settings.weight, model=aspect.settings.judge,
                                eval_path=aspect.pairs.eval.path, provenance=aspect.provenance,
                                training_reward=training_reward))
    return judges


def referees_of(settings: EvalSettings, eval_path: str) -> list[Judge]:
    """The referees: judges that are no training reward, earning their say on the policy's held-out pairs."""
    return [Judge(aspect=name, weight=referee.weight, model=referee.model, eval_path=eval_path,
                  provenance=f"referee, given: {redact(referee.model)}", referee=True)
            for name, referee in settings.referees.items()]


def summary_markdown(tracking_uri: str, parent, metrics: dict[str, float], registered: list[RegisteredVersion]) -> str:
    run_id, experiment_id = parent.info.run_id, parent.info.experiment_id
    if tracking_uri.startswith(("http://", "https://")):
        where = f"[MLflow run {run_id}]({tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    else:
        where = f"MLflow run `{run_id}` in `{tracking_uri}` (browse: `mlflow ui --backend-store-uri {tracking_uri}`)"
    lines = ["# preftune run", "", where, "", "| model | version | alias |", "|---|---|---|"]
    lines += [f"| {v.name} | {v.version} | {v.alias} |" for v in registered]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items()) if "." not in name]
    return "\n".join(lines) + "\n"


@flow(name="preference-tuning", flow_run_name="{config.profile}")
def preference_tuning(config: PipelineConfig = PipelineConfig()) -> PipelineSummary:
    redact_logs()
    require_cuda_if_asked()  # a pod given GPUs that CUDA cannot use fails now, not after planning for the CPU
    logger = get_run_logger()
    config = config.with_data_root()
    tracking_uri = redact(configure(config.tracking))  # what is shown; MLflow itself has the real one
    run_name = config.resolved_run_name()
    workspace = Workspace.open(Path(config.runs_dir) / run_name)
    logger.info("run %s in %s", run_name, redact(workspace.path))

    bytes_before = stored_bytes(Path(workspace.path), config.tracking.experiment)
    with mlflow.start_run(run_name=run_name) as parent:
        parent_id = parent.info.run_id
        mlflow.log_params(_flatten(config.model_dump()))
        tags = {"prefect.flow_run_id": str(flow_run.id), "git.commit": git_commit(), "mlflow.parent_run_id": parent_id,
                "config.sha256": fingerprint(config.model_dump(mode="json"))}
        mlflow.set_tags(tags | {"preftune.profile": config.profile, "preftune.run_dir": redact(workspace.path)})

        method, policy_settings = method_named(config.method), config.policy_settings()
        mlflow.set_tag("preftune.method", config.method)
        base = resolve_base_model(config.model)
        loaded, raw, pairs = prepare_data(config.data, base, policy_settings.max_length, workspace, "data")
        tags["data.sha256"] = loaded.sha256

        # Data for every stage first, then one plan per training stage, shown before anything trains.
        aspects = [prepare_aspect(name, settings, config, base, raw, pairs, workspace)
                   for name, settings in config.rewards.items()]
        if config.sft.enabled:
            if config.sft.chat_data:
                sft_pairs = prepare_chat_data(config.sft.chat_data, workspace)
            else:
                sft_pairs = pairs if config.sft.data is None else prepare_data(
                    config.sft.data, base, config.sft.max_length, workspace, "data-sft")[2]
            sft_plan = plan_training("sft", "sft", config.sft, base, config.plan, sft_pairs.train.rows,
                                     config.distributed)
        policy_plan = plan_training(config.method, method.plan_kind, policy_settings, base, config.plan,
                                    pairs.train.rows, config.distributed)
        publish_plans([a.plan for a in aspects if a.plan] + ([sft_plan] if config.sft.enabled else []) + [policy_plan])
        mlflow.set_tags({"preftune.device": policy_plan.device, "preftune.adapter": policy_plan.adapter,
                         "preftune.precision": policy_plan.precision, "preftune.plan": policy_plan.mode})

        # Independent stages (the reward aspects, SFT) train at the same time when `parallel_stages` says so,
        # each in a process of its own and as many at once as the `gpu` tag's concurrency limit allows
        # (`preftune deploy` sizes it by the GPUs); an offline policy starts as soon as SFT is done.
        parallel = config.parallel_stages if config.parallel_stages is not None else len(DevicePool.visible()) > 1
        distributed = config.distributed.model_copy(update={"separate_process": config.distributed.separate_process
                                                                                  or parallel})
        reward_training, sft_training = {}, None
        for aspect in aspects:
            if aspect.plan is not None:
                reward_training[aspect.name] = train_reward.submit(aspect.name, aspect.settings, aspect.model,
                                                                   aspect.pairs, aspect.plan, workspace, parent_id,
                                                                   distributed)
                if not parallel:
                    reward_training[aspect.name].wait()
        if config.sft.enabled:
            sft_training = train_sft.submit(config.sft, base, sft_pairs, sft_plan, workspace, parent_id, distributed)
        policy_start, adapters, sft_run = base, [], {}
        if sft_training:
            sft = sft_training.result()
            policy_start, adapters = base.starting_from(sft.model_dir), [sft.adapter_dir]
            sft_run = {"sft": sft.mlflow_run_id} if sft.mlflow_run_id else {}
        rewards = [RewardFunction(aspect=j.aspect, model=j.model, weight=j.weight)
                   for j in judges_of(aspects, results(reward_training))] if method.online else []
        policy_training = train_policy.submit(config.method, policy_settings, policy_start, pairs, policy_plan, rewards,
                                              workspace, parent_id, distributed)
        rewards_trained, policy = results(reward_training), policy_training.result()
        aspect_judges = judges_of(aspects, rewards_trained, training_reward=method.online)
        trained_against = aspect_judges if method.online else []
        judges = aspect_judges + referees_of(config.evaluation, pairs.eval.path)
        reward_dirs = {name: reward.model_dir for name, reward in rewards_trained.items()}
        stage_runs = ({f"reward-{name}": reward.mlflow_run_id for name, reward in rewards_trained.items()} | sft_run
                      | {config.method: policy.mlflow_run_id})
        merged = merge_adapters(base.path, adapters + [policy.adapter_dir], pairs.eval.path, config.merge, workspace)

        champion = current_champion(config.tracking, merged.model_dir)
        evaluation = evaluate(config.evaluation, pairs.eval.path, policy_start.path, merged.model_dir, judges, champion,
                              workspace, parent_id, stage_runs, config.method, method.implicit_reward)
        decision = decide_promotion(evaluation.gate, config.tracking.promotion)

        metrics = evaluation.metrics | {"merge.max_logit_difference": merged.max_logit_difference}
        mlflow.set_tag("merge.device", merged.device)
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(evaluation.report_path, "evaluation")
        create_markdown_artifact(key="evaluation-report", markdown=Path(evaluation.report_path).read_text(),
                                 description=f"MLflow run {parent_id}")

        registered: list[RegisteredVersion] = []
        if config.tracking.register_models:
            registered = register(merged.model_dir, reward_dirs, decision, config.tracking, parent_id,
                                  tags | {"method": config.method}, trained_against)
        create_markdown_artifact(key="promotion", markdown=decision.explanation(), description="Promotion gate")
        logger.info("promotion: %s", decision.explanation())
        bytes_written = stored_bytes(Path(workspace.path), config.tracking.experiment) - bytes_before
        mlflow.log_metric("disk.bytes_written", bytes_written)
    create_markdown_artifact(key="run-summary", markdown=summary_markdown(tracking_uri, parent, metrics, registered),
                             description="Where this run's results are")
    return PipelineSummary(mlflow_run_id=parent_id, tracking_uri=tracking_uri, run_dir=workspace.path,
                           bytes_written=bytes_written,
                           metrics=metrics, promotion=decision, registered=registered)
