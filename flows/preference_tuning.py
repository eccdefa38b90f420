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
from tasks.distributed import DistributedSettings, stages_in_parallel
from tasks.evaluate import evaluate
from tasks.judges import Aspect, judges_of, prepare_aspect, referees_of
from tasks.merge import merge_adapters
from tasks.methods import method_named
from tasks.models import ResolvedModel, resolve_base_model
from tasks.plan import TrainingPlan, plan_training, publish_plans
from tasks.policy import RewardFunction, train_policy
from tasks.prepare import PreparedData, prepare_data
from tasks.reward import RewardResult, train_reward
from tasks.sft import SFTResult, prepare_chat_data, train_sft
from tasks.tracking import RegisteredVersion, configure, current_champion, decide_promotion, register


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
        return prepare_data(config.sft.data, base, config.sft.max_length, workspace, stages.data_for(stages.SFT)).formatted
    return data.formatted


def plan_stages(config: PipelineConfig, base: ResolvedModel, aspects: list[Aspect], sft_data: SplitData | None,
                data: PreparedData) -> StagePlans:
    by_aspect = {aspect.name: aspect for aspect in aspects}
    plans = {}
    for stage in stages.training_stages(config):
        aspect = by_aspect.get(stage.aspect)
        model = aspect.model if aspect else base
        pairs = aspect.pairs if aspect else sft_data if stage.name == stages.SFT else data.formatted
        plans[stage.name] = plan_training(stage.name, stage.kind, stage.settings, model, config.plan,
                                          pairs.train.rows, config.distributed)
    return StagePlans(rewards={aspect.name: plans[stages.reward(aspect.name)] for aspect in aspects if aspect.trains},
                      sft=plans.get(stages.SFT), policy=plans[config.method])


def submit_reward_models(aspects: list[Aspect], plans: StagePlans, workspace: Workspace, parent_run_id: str,
                         distributed: DistributedSettings, parallel: bool) -> dict[str, PrefectFuture]:
    """Each trained aspect's reward model: all at once when stages train in parallel, else one by one."""
    futures = {}
    for aspect in aspects:
        if aspect.name in plans.rewards:
            futures[aspect.name] = train_reward.submit(aspect.name, aspect.settings, aspect.model, aspect.pairs,
                                                       plans.rewards[aspect.name], workspace, parent_run_id, distributed)
            if not parallel:
                futures[aspect.name].wait()
    return futures


def results(futures: dict[str, PrefectFuture]) -> dict:
    """The submitted tasks' results by name, waiting for those still running."""
    return {name: future.result() for name, future in futures.items()}


def stage_runs(rewards: dict[str, RewardResult], sft: SFTResult | None, policy_stage: str, policy_run: str) -> dict:
    """Each training stage's MLflow run, for the evaluation's training curves."""
    runs = {stages.reward(name): reward.mlflow_run_id for name, reward in rewards.items()}
    return runs | ({stages.SFT: sft.mlflow_run_id} if sft and sft.mlflow_run_id else {}) | {policy_stage: policy_run}


@flow(name="preference-tuning", flow_run_name="{config.profile}")
def preference_tuning(config: PipelineConfig = PipelineConfig()) -> PipelineSummary:
    redact_logs()
    require_cuda_if_asked()  # a pod given GPUs that CUDA cannot use fails now, not after planning for the CPU
    logger = get_run_logger()
    config = config.with_data_root()
    tracking_uri = redact(configure(config.tracking))  # what is shown; MLflow itself has the real one
    workspace = Workspace.open(Path(config.runs_dir) / config.resolved_run_name())
    logger.info("run %s in %s", config.resolved_run_name(), redact(workspace.path))
    method, policy_settings = method_named(config.method), config.policy_settings()

    with parent_run(config, workspace, tracking_uri) as run:
        # 1. Data for every stage: the policy's pairs, each judge's, SFT's.
        base = resolve_base_model(config.model)
        data = prepare_data(config.data, base, policy_settings.max_length, workspace)
        run.add_lineage(**{"data.sha256": data.loaded.sha256})
        aspects = [prepare_aspect(name, settings, base, data, config.data, workspace)
                   for name, settings in config.rewards.items()]
        benchmark = prepare_benchmark(config.evaluation.benchmark, workspace) if config.evaluation.benchmark else None
        sft_data = sft_pairs(config, base, data, workspace) if config.sft.enabled else None

        # 2. One plan per training stage, shown before anything trains.
        plans = plan_stages(config, base, aspects, sft_data, data)
        publish_plans(plans.all())

        # 3. Reward models and SFT (at the same time when stages train in parallel), then the policy.
        parallel = stages_in_parallel(config.parallel_stages)
        distributed = config.distributed.for_stages_in_parallel(parallel)
        reward_futures = submit_reward_models(aspects, plans, workspace, run.run_id, distributed, parallel)
        sft_future = train_sft.submit(config.sft, base, sft_data, plans.sft, workspace, run.run_id,
                                      distributed) if sft_data else None
        sft = sft_future.result() if sft_future else None
        policy_start = base.starting_from(sft.model_dir) if sft else base
        rewards = [RewardFunction(aspect=j.aspect, model=j.model, weight=j.weight)
                   for j in judges_of(aspects, results(reward_futures))] if method.online else []
        policy = train_policy(config.method, policy_settings, policy_start, data.formatted, plans.policy, rewards,
                              workspace, run.run_id, distributed)
        reward_models = results(reward_futures)

        # 4. One merged model: base + SFT adapter + policy adapter, checked against the unmerged stack.
        adapters = ([sft.adapter_dir] if sft else []) + [policy.adapter_dir]
        merged = merge_adapters(base.path, adapters, data.formatted.eval.path, config.merge, workspace,
                                answer_tokens=config.evaluation.max_new_tokens)  # the chat model answers as evaluated

        # 5. Evaluate on held-out questions with judges that earn their say, then the gate's verdict.
        aspect_judges = judges_of(aspects, reward_models, training_reward=method.online)
        judges = aspect_judges + referees_of(config.evaluation, data.formatted.eval.path)
        evaluation = evaluate(config.evaluation, data.formatted.eval.path, policy_start.path, merged.model_dir, judges,
                              current_champion(config.tracking, merged.model_dir), workspace, run.run_id,
                              stage_runs(reward_models, sft, config.method, policy.mlflow_run_id), config.method,
                              method.implicit_reward, data.formatted.train.path, benchmark)
        decision = decide_promotion(evaluation.gate, config.tracking.promotion)
        run.record_evaluation(evaluation, merged)

        # 6. Register the policy and the reward models (candidate, with their cards and the verdict), then the
        # promotion: champion at once when the gate passed it and no person must approve (flows/promotion.py).
        registered: list[RegisteredVersion] = []
        outcome, explanation = None, decision.explanation()
        if config.tracking.register_models:
            policy_plan = plans.policy
            tags = run.lineage | {"method": config.method, "base_model": redact(config.model.base_model),
                                  "data.source": redact(config.data.source),
                                  "plan.policy": f"{policy_plan.mode}: {policy_plan.adapter}, {policy_plan.precision} "
                                                 f"on {policy_plan.device}"}
            registered = register(merged.model_dir, {name: r.model_dir for name, r in reward_models.items()}, decision,
                                  config.tracking, run.run_id, tags, aspect_judges if method.online else [])
            outcome = start_promotion(registered[0], decision, config.tracking)
            explanation += f"\n\nOutcome: **{outcome.status}**: {outcome.message}"
        create_markdown_artifact(key="promotion", markdown=explanation, description="Promotion gate")
        logger.info("promotion: %s", explanation)
        summary = run.summary(decision, registered, outcome)
    publish_summary(summary, run.parent.info.experiment_id)
    return summary
