"""The preference-tuning flow: data -> plans -> reward models (and SFT) -> policy -> merge -> evaluate ->
gate -> register.

The policy stage trains whichever preference method the config names (tasks/methods.py); this flow
names none. Online methods score their generations with the reward models trained just before.

The flow only composes tasks inside the MLflow parent run (flows/run_record.py); each task opens its
own nested run and records what it owns. Tasks pass small typed results (paths, hashes, metrics), and
finished stages are cached by Prefect under the run's workspace, so a re-run with the same settings
resumes where the last one stopped.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture
from pydantic import BaseModel

from flows.config import PipelineConfig
from flows.promotion import start_promotion
from flows.run_record import PipelineSummary, parent_run, publish_summary
from tasks import stages
from tasks.base import Workspace, redact, redact_logs
from tasks.benchmark import prepare_benchmark
from tasks.cuda_required import require_cuda_if_asked
from tasks.data import SplitData
from tasks.distributed import stages_in_parallel
from tasks.evaluate import evaluate
from tasks.judges import Aspect, judges_of, prepare_aspect, referees_of
from tasks.merge import merge_adapters
from tasks.methods import method_named
from tasks.models import ResolvedModel, resolve_base_model
from tasks.plan import TrainingPlan, plan_training, publish_plans
from tasks.policy import train_policy
from tasks.prepare import PreparedData, prepare_data
from tasks.promotion import current_champion, decide_promotion
from tasks.recording import record_stage
from tasks.reward import RewardResult, train_reward
from tasks.run_context import RunContext
from tasks.sft import SFTResult, prepare_chat_data, train_sft
from tasks.tracking import RegisteredVersion, configure, register
from tasks.trainer import check_options
from tasks.training import FitResult


class StagePlans(BaseModel):
    """One training plan per stage, decided (and shown) before anything trains."""

    rewards: dict[str, TrainingPlan]  # aspects whose reward model is trained here
    sft: TrainingPlan | None
    policy: TrainingPlan

    def all(self) -> list[TrainingPlan]:
        return [*self.rewards.values(), *([self.sft] if self.sft else []), self.policy]


def sft_pairs(config: PipelineConfig, base: ResolvedModel, data: PreparedData, workspace: Workspace) -> SplitData:
    """SFT's data: conversations of its own, preference pairs of its own, or the pipeline's pairs."""
    if config.sft.chat_data:
        return prepare_chat_data(config.sft.chat_data, workspace)
    if config.sft.data:
        return prepare_data(
            config.sft.data, base, config.sft.max_length, workspace, stages.data_for(stages.SFT)
        ).formatted
    return data.formatted


def plan_stages(
    config: PipelineConfig, base: ResolvedModel, aspects: list[Aspect], sft_data: SplitData | None, data: PreparedData
) -> StagePlans:
    by_aspect = {aspect.name: aspect for aspect in aspects}
    plans = {}
    for stage in stages.training_stages(config):
        aspect = by_aspect.get(stage.aspect)
        model = aspect.model if aspect else base
        pairs = aspect.pairs if aspect else sft_data if stage.name == stages.SFT else data.formatted
        plans[stage.name] = plan_training(
            stage.name, stage.kind, stage.settings, model, config.plan, pairs.train.rows, config.distributed
        )
    return StagePlans(
        rewards={aspect.name: plans[stages.reward(aspect.name)] for aspect in aspects if aspect.trains},
        sft=plans.get(stages.SFT),
        policy=plans[config.method],
    )


def submit_reward_models(
    aspects: list[Aspect], plans: StagePlans, run: RunContext, parallel: bool
) -> dict[str, PrefectFuture]:
    """Each trained aspect's reward model: all at once when stages train in parallel, else one by one."""
    futures = {}
    for aspect in aspects:
        if aspect.name in plans.rewards:
            futures[aspect.name] = train_reward.submit(
                aspect=aspect.name,
                settings=aspect.settings,
                model=aspect.model,
                splits=aspect.pairs,
                plan=plans.rewards[aspect.name],
                run=run,
            )
            if not parallel:
                futures[aspect.name].wait()
    return futures


def results(futures: dict[str, PrefectFuture]) -> dict:
    """The submitted tasks' results by name, waiting for those still running."""
    return {name: future.result() for name, future in futures.items()}


def record_training(
    rewards: dict[str, RewardResult], sft: SFTResult | None, method: str, policy: FitResult, run: RunContext
) -> dict[str, str]:
    """Each finished training stage recorded into MLflow (its plan, curves, metrics): its run id by stage."""
    runs = {
        stages.reward(name): record_stage(stages.reward(name), reward.fit, run, reward.metrics())
        for name, reward in rewards.items()
    }
    if sft and sft.fit:
        runs[stages.SFT] = record_stage(stages.SFT, sft.fit, run)
    return runs | {method: record_stage(method, policy, run)}


@flow(name="preference-tuning", flow_run_name="{config.profile}")
def preference_tuning(config: PipelineConfig = PipelineConfig()) -> PipelineSummary:
    redact_logs()
    require_cuda_if_asked()  # a pod given GPUs that CUDA cannot use fails now, not after planning for the CPU
    logger = get_run_logger()
    config = config.with_data_root()
    tracking_uri = redact(configure(config.tracking))  # what is shown; MLflow itself has the real one
    workspace = Workspace.open(Path(config.runs_dir) / config.resolved_run_name())
    logger.info("run %s in %s", config.resolved_run_name(), redact(workspace.path))
    check_options(config)  # every stage's TRL options, before anything loads
    method, policy_settings = method_named(config.method), config.policy_settings()
    parallel = stages_in_parallel(config.parallel_stages)

    with parent_run(config, workspace, tracking_uri) as record:
        run = RunContext(
            workspace=workspace,
            parent_run_id=record.run_id,
            distributed=config.distributed.for_stages_in_parallel(parallel),
        )

        # 1. Data for every stage: the policy's pairs, each judge's, SFT's, the benchmark's prompts.
        base = resolve_base_model(config.model)
        data = prepare_data(
            settings=config.data, model=base, max_length=policy_settings.max_length, workspace=workspace
        )
        record.add_lineage(**{"data.sha256": data.loaded.sha256})
        aspects = [
            prepare_aspect(
                name, settings, policy_model=base, pipeline=data, pipeline_data=config.data, workspace=workspace
            )
            for name, settings in config.rewards.items()
        ]
        benchmark = (
            prepare_benchmark(settings=config.evaluation.benchmark, workspace=workspace)
            if config.evaluation.benchmark
            else None
        )
        sft_data = sft_pairs(config, base, data, workspace) if config.sft.enabled else None

        # 2. One plan per training stage, shown before anything trains.
        plans = plan_stages(config, base, aspects, sft_data, data)
        publish_plans(plans.all())

        # 3. Reward models and SFT (at the same time when stages train in parallel), then the policy; then
        # each finished stage recorded into MLflow.
        reward_futures = submit_reward_models(aspects, plans, run, parallel)
        sft = (
            train_sft.submit(settings=config.sft, model=base, splits=sft_data, plan=plans.sft, run=run).result()
            if sft_data
            else None
        )
        policy_start = base.starting_from(sft.model_dir) if sft else base
        rewards = judges_of(aspects, results(reward_futures)) if method.online else []  # online: scored by them
        policy = train_policy(
            method=config.method,
            settings=policy_settings,
            model=policy_start,
            splits=data.formatted,
            plan=plans.policy,
            rewards=rewards,
            run=run,
        )
        reward_models = results(reward_futures)
        stage_runs = record_training(reward_models, sft, config.method, policy, run)

        # 4. One merged model: base + SFT adapter + policy adapter, checked against the unmerged stack.
        adapters = ([sft.adapter_dir] if sft else []) + [policy.adapter_dir]
        merged = merge_adapters(
            base_path=base.path,
            adapter_dirs=adapters,
            eval_path=data.formatted.eval.path,
            settings=config.merge,
            workspace=workspace,
            answer_tokens=config.evaluation.max_new_tokens,
        )  # the chat model answers as evaluated

        # 5. Evaluate on held-out questions with judges that earn their say, then the gate's verdict.
        aspect_judges = judges_of(aspects, reward_models, training_reward=method.online)
        evaluation = evaluate(
            settings=config.evaluation,
            pairs_path=data.formatted.eval.path,
            reference=policy_start.path,
            policy=merged.model_dir,
            judges=aspect_judges + referees_of(config.evaluation, data.formatted.eval.path),
            champion_uri=current_champion(config.tracking, merged.model_dir),
            run=run,
            stage_runs=stage_runs,
            method=config.method,
            implicit=method.implicit_reward,
            train_path=data.formatted.train.path,
            benchmark=benchmark,
        )
        decision = decide_promotion(gate=evaluation.gate, settings=config.tracking.promotion)
        record.record_evaluation(evaluation, merged)

        # 6. Register the policy and the reward models (candidate, with their cards), then the promotion: the
        # verdict recorded, champion at once when the gate passed it and no person must approve (flows/promotion.py).
        registered: list[RegisteredVersion] = []
        outcome, explanation = None, decision.explanation()
        if config.tracking.register_models:
            policy_plan = plans.policy
            tags = record.lineage | {
                "method": config.method,
                "base_model": redact(config.model.base_model),
                "data.source": redact(config.data.source),
                "plan.policy": f"{policy_plan.mode}: {policy_plan.adapter}, "
                f"{policy_plan.precision} on {policy_plan.device}",
            }
            registered = register(
                policy_dir=merged.model_dir,
                reward_dirs={name: r.model_dir for name, r in reward_models.items()},
                decision=decision,
                settings=config.tracking,
                parent_run_id=record.run_id,
                tags=tags,
                trained_against=aspect_judges if method.online else [],
            )
            outcome = start_promotion(policy=registered[0], decision=decision, tracking=config.tracking)
            explanation += f"\n\nOutcome: **{outcome.status}**: {outcome.message}"
        create_markdown_artifact(key="promotion", markdown=explanation, description="Promotion gate")
        logger.info("promotion: %s", explanation)
        summary = record.summary(decision, registered, outcome)
    publish_summary(summary, record.parent.info.experiment_id)
    return summary
