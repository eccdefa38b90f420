"""Several processes by configuration: plans that split the effective batch, accelerate configs for
every strategy, and a real 2-process (gloo) run of the flow on this CPU that is killed and resumes."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from mlflow import MlflowClient

from tasks.base import PreftuneError
from tasks.data import DataFile, DataSettings, SplitData, apply_filter, format_split, load, split
from tasks.distributed import ACCELERATE_CONFIGS, DevicePool, DistributedSettings
from tasks.launcher import Launch
from tasks.models import ModelSettings, RandomInitSettings, ResolvedModel, load_tokenizer
from tasks.plan import DeviceSpec, PlanSettings, plan_stage, shape_of
from tasks.policy import policy_spec, train_policy_adapter
from tasks.settings.training import PolicySettings
from tasks.tracking import TrackingSettings, configure
from tasks.trainer import RewardFunction
from tasks.training import resume_point

REPO = Path(__file__).resolve().parent.parent
SMOKE = ModelSettings(random_init=RandomInitSettings())
CPU = DeviceSpec(kind="cpu", name="cpu", memory_gib=16, bf16=False)
GPU = DeviceSpec.described_gpu(80, bf16=True)


def _plan(settings, processes: int, strategy="ddp", device=CPU, model=SMOKE):
    return plan_stage(
        "dpo",
        "dpo",
        settings,
        model,
        shape_of(model),
        device,
        PlanSettings(),
        distributed=DistributedSettings(num_processes=processes, strategy=strategy),
    )


def test_processes_share_the_effective_batch_of_one():
    settings = PolicySettings(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    one, two = _plan(settings, 1), _plan(settings, 2)
    assert one.micro_batch * one.gradient_accumulation == 8 and one.processes == 1 and one.strategy == "single"
    assert two.micro_batch * two.gradient_accumulation * two.processes == 8 == two.effective_batch
    assert two.trainer_overrides()["ddp_find_unused_parameters"] is False
    with pytest.raises(PreftuneError, match="effective batch 8 .* does not divide over 3 processes"):
        _plan(settings, 3)


def test_sharded_strategies_hold_a_share_of_the_weights():
    model = ModelSettings(random_init=RandomInitSettings(hidden_size=256, num_hidden_layers=16, intermediate_size=512))
    settings = PolicySettings(per_device_train_batch_size=8, max_length=512)
    single = _plan(settings, 1, device=GPU, model=model).memory
    ddp, fsdp = (_plan(settings, 8, strategy, device=GPU, model=model).memory for strategy in ("ddp", "fsdp"))
    assert ddp.weights_gib == pytest.approx(single.weights_gib)  # DDP replicates the model
    assert fsdp.weights_gib < single.weights_gib / 4  # FSDP: 1/8 plus the layer being computed
    assert fsdp.adapter_gib < ddp.adapter_gib


@pytest.mark.parametrize(
    "strategy, kind",
    [
        ("ddp", DistributedType.MULTI_GPU),
        ("fsdp", DistributedType.FSDP),
        ("deepspeed_zero2", DistributedType.DEEPSPEED),
        ("deepspeed_zero3", DistributedType.DEEPSPEED),
    ],
)
def test_every_strategy_has_an_accelerate_config(strategy, kind):
    config = load_config_from_file(str(DistributedSettings(strategy=strategy).accelerate_config()))
    assert config.distributed_type == kind and config.num_machines == 1
    if strategy.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(strategy[-1])
    assert (ACCELERATE_CONFIGS / f"{strategy}.yaml").is_file()


def test_a_missing_accelerate_config_is_named():
    with pytest.raises(PreftuneError, match="distributed.config_file /nowhere.yaml does not exist"):
        DistributedSettings(config_file="/nowhere.yaml").accelerate_config()


def test_the_ranks_train_the_spec_the_task_built(tmp_path):
    """What the ranks read from launch.json is the task's trainer spec and plan, types included."""
    splits = SplitData(
        train=DataFile(path="/t.jsonl", rows=3, sha256="a"), eval=DataFile(path="/e.jsonl", rows=1, sha256="b")
    )
    settings = PolicySettings(max_steps=3, beta=0.2, per_device_train_batch_size=4)
    spec = policy_spec(
        "grpo",
        settings,
        ResolvedModel(path="/m", settings=SMOKE),
        splits,
        [RewardFunction(aspect="helpfulness", model="/r", weight=0.5)],
    )
    assert spec.arguments["beta"] == 0.2 and spec.arguments["num_generations"] == 4  # ours over the method's
    assert "max_length" not in spec.arguments and "lora" not in spec.arguments  # GRPOConfig has neither
    sent = Launch(spec=spec, plan=_plan(settings, 2), stage_dir=str(tmp_path))
    assert Launch.model_validate_json(sent.model_dump_json()) == sent


def test_the_pool_hands_out_visible_gpus_and_none_on_a_cpu():
    visible = DevicePool.visible()
    with DevicePool().claim(1) as devices:
        assert devices == (visible[0] if visible else None)


def _cli(*args: str, cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "preftune"), *args],
        cwd=cwd,
        text=True,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.slow(minutes=1.7)
def test_two_processes_train_resume_after_a_kill_and_register(tmp_path, coin_judge_path, prefect_api):
    """`distributed.num_processes=2` on this CPU: DPO on 2 gloo ranks through `accelerate launch`, SIGKILLed
    (the CLI, the launcher and both ranks) at a seeded random moment after its first checkpoint and run
    again. The re-run skips the finished stages, resumes from the checkpoint (at most one checkpoint
    interval of work lost) and ends at the same final step; both ranks ended with bit-identical adapters
    (synchronised gradients), the global batch is the single-process one, and the policy registers like
    any run. (A kill in a single process resumes the same way: `test_faults` stops a training mid-run.)"""
    env = os.environ | prefect_api | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    # The judges are given (a judge at chance for each aspect), so DPO is the one stage launched.
    args = [
        "run",
        "--profile",
        "smoke",
        "--set",
        "distributed.num_processes=2",
        "--set",
        "sft.enabled=false",
        "--set",
        "policy.max_steps=16",
        "--set",
        "policy.save_steps=2",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        "--set",
        f"rewards.helpfulness.judge={coin_judge_path}",
        "--set",
        f"rewards.harmlessness.judge={coin_judge_path}",
    ]
    first = _cli(*args, cwd=tmp_path, env=env)
    while not list((tmp_path / "runs").glob("smoke/dpo/*/checkpoints/checkpoint-2/trainer_state.json")):
        assert first.poll() is None, first.stdout.read()[-4000:]
        time.sleep(0.1)
    time.sleep(random.Random(95).uniform(0.0, 1.0))  # somewhere after checkpoint-2, the same place every run
    os.killpg(first.pid, signal.SIGKILL)  # the CLI, the launcher and both ranks
    first.wait()
    [checkpoints] = (tmp_path / "runs").glob("smoke/dpo/*/checkpoints")
    newest = resume_point(checkpoints)  # the newest complete checkpoint the kill left

    second = _cli(*args, cwd=tmp_path, env=env)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-4000:]
    assert re.search(r"Task run 'format-data' - Finished in state Cached", output)  # finished stages are skipped
    resumed = re.search(r"resuming from (checkpoint-\d+)", output)  # rank 0's log line
    assert resumed, f"the re-run did not resume DPO (killed after {newest}):\n{output[-3000:]}"
    assert resumed.group(1) == Path(newest).name  # at most one checkpoint interval (save_steps) redone
    [stage] = (tmp_path / "runs").glob("smoke/dpo/*")
    fitted = json.loads((stage / "fit.json").read_text())
    single = _plan(PolicySettings(per_device_train_batch_size=4, max_length=128), 1)
    assert fitted["global_step"] == 16 and fitted["processes"] == 2
    assert fitted["global_batch"] == single.micro_batch * single.gradient_accumulation == 4
    first_rank, second_rank = fitted["replica_checksums"]
    assert first_rank == second_rank
    assert [entry["step"] for entry in fitted["history"] if "loss" in entry] == list(range(1, 17))

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("preftune").experiment_id
    [parent] = client.search_runs([experiment], "tags.`preftune.profile` = 'smoke' and attributes.status = 'FINISHED'")
    dpo_runs = client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`preftune.stage` = 'dpo'"
    )
    [dpo] = dpo_runs  # recorded once, after training
    assert dpo.data.params["plan.dpo.processes"] == "2"
    assert [m.step for m in client.get_metric_history(dpo.info.run_id, "loss")] == list(range(1, 17))
    version = client.get_model_version_by_alias("preftune-smoke-policy", "candidate")
    assert (
        version.tags["method"] == "dpo"
        and version.tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"]
    )


def test_a_bad_setting_in_a_rank_is_a_user_error_not_a_retried_crash(tiny_model_path, tmp_path, tracking_uri):
    """GRPO's config check runs inside the ranks (it needs their world size): its message reaches the
    task as a PreftuneError, which Prefect does not retry, instead of an exit code and a traceback."""
    configure(TrackingSettings())
    data = DataSettings(synthetic_rows=24)
    pairs = format_split(
        split(apply_filter(load(data, tmp_path), data, tmp_path), data, tmp_path),
        load_tokenizer(tiny_model_path, SMOKE),
        tmp_path,
    )
    settings = PolicySettings(max_steps=1, per_device_train_batch_size=2, num_generations=4, max_length=64)
    with pytest.raises(PreftuneError, match="grpo settings: .*num_generations"):
        train_policy_adapter(
            "grpo",
            settings,
            ResolvedModel(path=tiny_model_path, settings=SMOKE),
            pairs,
            tmp_path / "grpo",
            rewards=[RewardFunction(aspect="helpfulness", model=tiny_model_path, weight=1.0)],
            distributed=DistributedSettings(num_processes=2),
        )
