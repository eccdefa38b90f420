"""Training one stage: the settings every TRL trainer shares, `fit` (the one entry: in this process,
or handed to the launcher for several), and the checkpoint plumbing that makes training resumable."""
from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, ClassVar

import mlflow
import torch
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import TrainerCallback, set_seed
from transformers.integrations import MLflowCallback

from tasks.base import PreftuneError, retry_unless_user_error
from tasks.caching import TRAINING_CACHE
from tasks.distributed import DEVICES, DevicePool, DistributedSettings, is_main_process
from tasks.launcher import launch
from tasks.models import LoraSettings
from tasks.plan import TrainingPlan, keep_freed_memory


class TrainerSettings(BaseModel):
    """A stage's TRL `*Config`, under TRL's own names: the fields below are the ones every stage uses
    (with our defaults); any other key is passed to the TRL config as it is, after a check that the
    class has such a field, so a TRL option is one YAML key away and a typo still fails by name. The
    training plan (tasks/plan.py) decides precision, micro-batch x accumulation, checkpointing and optimizer."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    # Fields of ours, not TRL's: kept out of the TRL config.
    own_fields: ClassVar[set[str]] = {"lora", "evaluate_after_training", "keep_checkpoints"}
    # The TRL config class the extra keys must belong to (None: checked by whoever picks the class).
    trl_config: ClassVar[str | None] = None

    max_steps: int = Field(40, gt=0, description="Optimizer steps the stage trains for.")
    per_device_train_batch_size: int = Field(2, gt=0, description=(
        "Examples per micro-batch; times gradient_accumulation_steps it is the effective batch the plan keeps."))
    per_device_eval_batch_size: int = Field(8, gt=0, description="Examples per batch in the trainer's held-out pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of the schedule.")
    lr_scheduler_type: str = Field("cosine", description="transformers' learning-rate schedule (cosine, linear, ...).")
    warmup_steps: float = Field(0.1, ge=0, description=(
        "Warm-up steps; below 1, a fraction of max_steps (TRL 1.x dropped warmup_ratio)."))
    optim: str = Field("adamw_torch", description="transformers' optimizer name (the auto plan may pick an "
                                                  "equivalent implementation for the device).")
    max_length: int = Field(256, gt=8, description="Tokens per sequence, prompt and answer together; longer rows "
                                                   "are shortened by the data stage.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (the auto "
                                                            "plan turns it on only when memory is short).")
    logging_steps: int = Field(5, gt=0, description="Steps between training-curve points logged to MLflow.")
    save_steps: int = Field(20, gt=0, description="Steps between checkpoints a killed run resumes from.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk while the stage trains.")
    seed: int = Field(42, description="Seed for the new weights (LoRA, reward head) and the data order.")
    evaluate_after_training: bool = Field(False, description=(
        "Run the trainer's own held-out pass after training (off: the evaluate stage measures the same pairs, "
        "with intervals, and on a CPU this pass can cost as much as training)."))
    keep_checkpoints: bool = Field(False, description=(
        "Keep the checkpoints once the stage is done (off: the adapter and history are all later stages need)."))
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The LoRA adapter the stage trains.")

    @model_validator(mode="after")
    def _options_known_to_trl(self) -> "TrainerSettings":
        if self.trl_config and self.model_extra:
            from tasks.methods import load_class, unknown_options

            unknown = unknown_options(set(self.model_extra), load_class(self.trl_config))
            if unknown:
                raise ValueError(unknown_message(unknown, self.trl_config))
        return self

    def trainer_args(self, output_dir: Path, plan: TrainingPlan, run_name: str) -> dict:
        """The stage's TRL config arguments in one step: its settings, then what the plan decided."""
        # The plan decides checkpointing, under transformers' current name (activation_checkpointing).
        return self.model_dump(exclude=self.own_fields | {"gradient_checkpointing"}) | plan.trainer_overrides() | dict(
            output_dir=str(output_dir),
            run_name=run_name,
            save_strategy="steps",
            report_to=["mlflow"],  # curves go to the stage's active MLflow run
            disable_tqdm=False,
        )


def unknown_message(unknown: list[str], config: str) -> str:
    return f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} ({config.rsplit('.', 1)[-1]} has no such field)"


log = logging.getLogger(__name__)
OOM_RECORD = "oom-adjustment.json"


DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class TrackingUnavailableError(RuntimeError):
    """The tracking server went away mid-training: transient, so the task's retry resumes from the
    last checkpoint; the error is raised, never swallowed, so no metrics are lost silently."""


class DiskFullError(PreftuneError):
    """Retrying cannot help until space is freed; the previous checkpoint is intact."""


def is_disk_full(error: Exception) -> bool:
    """Python raises OSError(ENOSPC); the Rust and C++ writers (tokenizers, safetensors, torch.save)
    raise plain exceptions that only say so in their message."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return True
    return any(text in str(error) for text in ("No space left on device", "os error 28", "file write failed"))


def resume_point(checkpoint_dir: Path) -> str | None:
    """The newest *complete* checkpoint a killed run left behind (the Trainer writes its state file
    last, so a checkpoint cut short by a kill or a full disk has none and is skipped)."""
    complete = [path for path in checkpoint_dir.glob("checkpoint-*") if (path / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda path: int(path.name.split("-")[1]))) if complete else None


def load_pairs(path: str):
    """A conversational file (written by tasks/data.py) as a `datasets.Dataset`, without the columns that
    are for evaluation only (a row's IFEval instructions)."""
    from datasets import load_dataset

    from tasks.schemas import INSTRUCTION_COLUMNS

    dataset = load_dataset("json", data_files=path, split="train")
    return dataset.remove_columns([name for name in INSTRUCTION_COLUMNS if name in dataset.column_names])


def numeric(metrics: dict) -> dict[str, float]:
    """Trainer metrics as MLflow-safe names and floats."""
    return {key.replace("/", "_"): float(value) for key, value in metrics.items() if isinstance(value, (int, float))}


def adjusted_for_oom(plan: TrainingPlan, stage_dir: Path) -> TrainingPlan:
    """After an out-of-memory failure the retry trains with the shrunk plan that failure recorded:
    half the micro-batch and twice the accumulation (the same effective batch), then checkpointing."""
    record = stage_dir / OOM_RECORD
    if not record.exists():
        return plan
    adjusted = TrainingPlan.model_validate_json(record.read_text())
    log.warning("previous attempt ran out of memory: micro-batch %s x accumulation %s, checkpointing %s",
                adjusted.micro_batch, adjusted.gradient_accumulation, adjusted.gradient_checkpointing)
    return adjusted


def record_oom(plan: TrainingPlan, stage_dir: Path) -> TrainingPlan:
    """The shrunk plan the retry trains with, recorded by every rank that ran out of memory (the same
    plan; written whole, so a rank never reads another's half-written file)."""
    shrunk = plan.shrunk()
    stage_dir.mkdir(parents=True, exist_ok=True)
    partial = stage_dir / f"{OOM_RECORD}.{os.getpid()}"
    partial.write_text(shrunk.model_dump_json())
    partial.replace(stage_dir / OOM_RECORD)
    return shrunk


def keep_trainable_dtype(model: torch.nn.Module, plan: TrainingPlan) -> None:
    """TRL casts LoRA weights on 4-bit models to bf16; under fp16 (cards without bf16) the gradient
    scaler cannot unscale bf16 gradients, so the plan keeps them in fp32 there (and on a CPU)."""
    dtype = getattr(torch, plan.trainable_dtype)
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


class PrefectProgress(TrainerCallback):
    """Training progress as a Prefect progress artifact, so the UI shows how far a long step is."""

    def __init__(self, stage: str, every_s: float = 5.0):
        self.stage, self.every_s, self.artifact_id, self.last = stage, every_s, None, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.artifact_id = create_progress_artifact(0.0, description=f"{self.stage}: training steps done (%)")

    def on_step_end(self, args, state, control, **kwargs):
        if self.artifact_id and (time.monotonic() - self.last > self.every_s or state.global_step == state.max_steps):
            update_progress_artifact(self.artifact_id, 100.0 * state.global_step / max(state.max_steps, 1))
            self.last = time.monotonic()


class SynchronousMLflowCallback(MLflowCallback):
    """Transformers logs metrics to MLflow in the background and drops a failed batch with a log
    line; logged synchronously, a lost tracking server fails the step instead, so the task's retry
    resumes from the last checkpoint and no curve is lost silently."""

    def setup(self, args, state, model):
        super().setup(args, state, model)
        self._async_log = False


class FitResult(BaseModel):
    adapter_dir: str
    metrics: dict[str, float]  # the trainer's held-out pass, when asked for
    train_examples: int  # rows the trainer trained on (all of them: overlong ones were shortened)
    processes: int = 1  # ranks that trained it
    global_batch: int = 0  # examples per optimizer step over all ranks (micro-batch x accumulation x ranks)
    replica_checksums: list[str] = []  # DDP: each rank's trainable weights (identical when gradients were synchronised)


FIT_RECORD = "fit.json"


def read_fit(stage_dir: Path, done: dict | None = None) -> FitResult:
    """What a finished stage recorded (also the result of a launched one, written by its rank 0)."""
    done = done or json.loads((stage_dir / FIT_RECORD).read_text())
    return FitResult.model_validate({key: value for key, value in done.items() if key in FitResult.model_fields}
                                    | {"adapter_dir": str(stage_dir / "adapter")})


def finished_fit(settings: TrainerSettings, stage_dir: Path) -> FitResult | None:
    """A stage found finished (e.g. a re-run against a new tracking store): its curves re-logged, no training."""
    record = stage_dir / FIT_RECORD
    if not (record.is_file() and (stage_dir / "adapter" / "adapter_config.json").is_file()):
        return None
    done = json.loads(record.read_text())
    if done["global_step"] < settings.max_steps:
        return None
    relog_history(done["history"])
    return read_fit(stage_dir, done)


def replica_checksums(trainer) -> list[str]:
    """Under DDP every rank holds the whole adapter; after training the copies must be bit-identical,
    which is what synchronised gradients guarantee. Sharded strategies hold parts: nothing to compare."""
    from accelerate.utils import DistributedType, gather_object

    state = trainer.accelerator.state
    if state.num_processes == 1 or state.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        return []
    digest = hashlib.sha256()
    for _, parameter in sorted(trainer.model.named_parameters()):
        if parameter.requires_grad:
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return gather_object([digest.hexdigest()])


def fit(factory: Callable, settings: TrainerSettings, plan: TrainingPlan, stage_dir: Path,
        distributed: DistributedSettings | None = None, **inputs) -> FitResult:
    """Train one stage: `factory(settings=..., stage_dir=..., **inputs)` returns the stage's `make_trainer`
    (see `train_here`). In this process, or launched (tasks/launcher.py): on `distributed.num_processes`
    processes, and on a machine with several GPUs always (so each stage trains on cards of its own)."""
    distributed = distributed or DistributedSettings()
    arguments = {"settings": settings, "stage_dir": stage_dir} | inputs
    if not (distributed.launched or len(DevicePool.visible()) > 1):
        return train_here(factory(**arguments), settings, plan, stage_dir)
    if done := finished_fit(settings, stage_dir):
        return done
    if inputs.get("callbacks"):
        raise PreftuneError("trainer callbacks cannot cross into launched processes: train in one process")
    with DEVICES.claim(distributed.num_processes) as devices:
        launch(factory, arguments, plan, stage_dir, distributed, devices)
    return read_fit(stage_dir)


def train_here(make_trainer: Callable[[TrainingPlan], object], settings: TrainerSettings, plan: TrainingPlan,
               stage_dir: Path) -> FitResult:
    """Train in this process from the last complete checkpoint, then record the finished stage.

    A stage found finished (a re-run against a new tracking store) trains nothing and re-logs its
    curves from its history. An out-of-memory error, while loading or training, is recorded and
    re-raised without the failed trainer attached (so its memory is freed): the task's Prefect retry
    then trains with the smaller micro-batch (see `adjusted_for_oom`)."""
    if done := finished_fit(settings, stage_dir):
        return done
    plan = adjusted_for_oom(plan, stage_dir)
    if is_main_process():
        mlflow.log_params(plan.params())
    checkpoints = stage_dir / "checkpoints"
    out_of_memory = None
    try:
        trainer = trained(make_trainer, settings, plan, stage_dir)
    except torch.OutOfMemoryError as error:
        out_of_memory = str(error).splitlines()[0][:300]
    except Exception as error:
        if (explained := explain_failure(error, checkpoints)) is None:
            raise
        raise explained from error
    if out_of_memory is not None:  # outside the handler: the traceback, and the failed trainer with it, is gone
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        retry = record_oom(plan, stage_dir)
        raise torch.OutOfMemoryError(f"{out_of_memory} (micro-batch {plan.micro_batch}; the retry uses "
                                     f"{retry.micro_batch})")
    return record_finished(trainer, settings, stage_dir)


def trained(make_trainer: Callable[[TrainingPlan], object], settings: TrainerSettings, plan: TrainingPlan,
            stage_dir: Path):
    """The stage's trainer, built for the plan and trained to the end (resumed where a checkpoint is)."""
    stage, checkpoints = stage_dir.parent.name, stage_dir / "checkpoints"
    if plan.device_kind == "cpu":
        keep_freed_memory()
    set_seed(settings.seed)  # before the model loads: a new head and the LoRA weights start the same every run
    if torch.cuda.is_available():  # this stage's own peak, from its model load on
        torch.cuda.reset_peak_memory_stats()
    trainer = make_trainer(plan)
    keep_trainable_dtype(trainer.model, plan)
    if trainer.pop_callback(MLflowCallback):
        trainer.add_callback(SynchronousMLflowCallback())
    if TaskRunContext.get():  # in a Prefect task: show progress in the UI
        trainer.add_callback(PrefectProgress(stage))
    resume_from = resume_point(checkpoints)
    if resume_from and is_main_process():
        log.warning("%s: resuming from %s", stage, Path(resume_from).name)
    trainer.train(resume_from_checkpoint=resume_from)
    if is_main_process() and torch.cuda.is_available():  # measured, beside the plan's estimated_peak_gib
        mlflow.log_metric("peak_memory_gib", torch.cuda.max_memory_allocated() / 2**30)
    return trainer


def explain_failure(error: Exception, checkpoints: Path) -> Exception | None:
    """The error a user should see for a failure they can act on (None: raise it as it is)."""
    resume = f"resumes from {resume_point(checkpoints) or 'the start'}"
    if isinstance(error, MlflowException) and "API request to" in error.message:
        return TrackingUnavailableError(f"lost the MLflow tracking server during training ({error.message[:200]}); "
                                        f"checkpoints are kept in {checkpoints} and a retry or re-run {resume}")
    if is_disk_full(error):
        return DiskFullError(f"no space left while writing to {checkpoints} ({error}); free some space and re-run: "
                             f"training {resume}")
    return None


def record_finished(trainer, settings: TrainerSettings, stage_dir: Path) -> FitResult:
    """Evaluate (if asked), save the adapter, and write what later stages and re-runs read (fit.json);
    the checkpoints go unless kept."""
    metrics = numeric(trainer.evaluate()) if settings.evaluate_after_training else {}
    adapter_dir = stage_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # every rank: sharded strategies gather the adapter here
    args = trainer.args
    result = FitResult(adapter_dir=str(adapter_dir), metrics=metrics, train_examples=len(trainer.train_dataset),
                       processes=args.world_size, replica_checksums=replica_checksums(trainer),
                       global_batch=args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size)
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        if len(set(result.replica_checksums)) > 1:
            log.error("the ranks' adapters differ after training (%s): gradients were not synchronised",
                      result.replica_checksums)
        (stage_dir / FIT_RECORD).write_text(json.dumps(
            {"global_step": trainer.state.global_step, "history": trainer.state.log_history}
            | result.model_dump(exclude={"adapter_dir"})))
        if not settings.keep_checkpoints:
            shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    return result


def relog_history(history: list[dict]) -> None:
    """A finished stage's curves, from its checkpoint, into the current MLflow run."""
    for entry in history:
        values = {key: float(value) for key, value in entry.items()
                  if isinstance(value, (int, float)) and key not in ("step", "epoch")}
        if values and "step" in entry:
            mlflow.log_metrics(values, step=int(entry["step"]))


GPU_TAG = "gpu"  # on every training task: the tag whose concurrency limit bounds training at once
# Other tasks carry no tags: Prefect asks the server for slots of every tag a task run has, and on SQLite
# that request is often answered "database is locked" and retried 2 s later, even where no limit exists.


def training_task(name: str, **options):
    """The Prefect task settings every trainer shares: retries for transient failures (not for user
    errors), the `gpu` tag for concurrency limits, and the training cache policy."""
    return task(name=name, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_user_error,
                tags=[GPU_TAG, "training"], cache_policy=TRAINING_CACHE, persist_result=True, **options)
