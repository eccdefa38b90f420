"""Training one stage from its spec: `fit` (in this process, or handed to the launcher for several),
`train` (build the trainer, resume from the last complete checkpoint, train, save), and `read_fit`
(what a finished stage left in its folder). Nothing here talks to MLflow: a finished stage's curves
are recorded by their own step (tasks/recording.py), so a lost tracking server never costs training.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from pydantic import BaseModel
from transformers import TrainerCallback, set_seed

from tasks.base import PreftuneError, redact, retry_unless_user_error
from tasks.caching import STAGE_CACHE
from tasks.distributed import DEVICES, DevicePool, DistributedSettings, is_main_process
from tasks.launcher import launch
from tasks.plan import TrainingPlan, keep_freed_memory
from tasks.trainer import TrainerSpec, build_trainer

log = logging.getLogger(__name__)
OOM_RECORD = "oom-adjustment.json"
FIT_RECORD = "fit.json"
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class DiskFullError(PreftuneError):
    """Retrying cannot help until space is freed; the previous checkpoint is intact."""


class FitResult(BaseModel):
    """What a finished stage left: its adapter, and what the recording step logs into MLflow."""

    adapter_dir: str
    metrics: dict[str, float]  # the trainer's held-out pass, when asked for
    train_examples: int  # rows the trainer trained on (all of them: overlong ones were shortened)
    processes: int = 1  # ranks that trained it
    global_batch: int = 0  # examples per optimizer step over all ranks (micro-batch x accumulation x ranks)
    replica_checksums: list[str] = []  # DDP: each rank's trainable weights (identical when gradients were synchronised)
    global_step: int = 0
    history: list[dict] = []  # the trainer's log history: the training curves
    plan: TrainingPlan | None = None  # the plan it trained with (after any out-of-memory adjustment)
    arguments: dict[str, str] = {}  # the TRL config it trained with, as MLflow params
    peak_memory_gib: float | None = None  # measured on a GPU, beside the plan's estimate


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
    log.warning(
        "previous attempt ran out of memory: micro-batch %s x accumulation %s, checkpointing %s",
        adjusted.micro_batch,
        adjusted.gradient_accumulation,
        adjusted.gradient_checkpointing,
    )
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


def read_fit(stage_dir: Path) -> FitResult:
    """What a finished stage recorded (also the result of a launched one, written by its rank 0); its
    adapter is where the folder is now (a run folder may have moved since)."""
    fitted = FitResult.model_validate_json((stage_dir / FIT_RECORD).read_text())
    return fitted.model_copy(update={"adapter_dir": str(stage_dir / "adapter")})


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


def fit(
    spec: TrainerSpec,
    plan: TrainingPlan,
    stage_dir: Path,
    distributed: DistributedSettings | None = None,
    callbacks: list | None = None,
) -> FitResult:
    """Train one stage: in this process, or launched (tasks/launcher.py) on `distributed.num_processes`
    processes, and on a machine with several GPUs always (so each stage trains on cards of its own)."""
    if (stage_dir / FIT_RECORD).is_file():  # a retry after training finished (a later step of the task failed)
        return read_fit(stage_dir)
    distributed = distributed or DistributedSettings()
    if not (distributed.launched or len(DevicePool.visible()) > 1):
        return train(spec, plan, stage_dir, callbacks)
    if callbacks:
        raise PreftuneError("trainer callbacks cannot cross into launched processes: train in one process")
    with DEVICES.claim(distributed.num_processes) as devices:
        launch(spec, plan, stage_dir, distributed, devices)
    return read_fit(stage_dir)


def train(spec: TrainerSpec, plan: TrainingPlan, stage_dir: Path, callbacks: list | None = None) -> FitResult:
    """Train in this process from the last complete checkpoint, then save the finished stage.

    An out-of-memory error, while loading or training, is recorded and re-raised without the failed
    trainer attached (so its memory is freed): the task's Prefect retry then trains with the smaller
    micro-batch (see `adjusted_for_oom`)."""
    plan = adjusted_for_oom(plan, stage_dir)
    checkpoints = stage_dir / "checkpoints"
    out_of_memory = None
    try:
        trainer = _trained(spec, plan, checkpoints, callbacks)
    except torch.OutOfMemoryError as error:
        out_of_memory = str(error).splitlines()[0][:300]
    except Exception as error:
        if not is_disk_full(error):
            raise
        resume = resume_point(checkpoints) or "the start"
        raise DiskFullError(
            f"no space left while writing to {checkpoints} ({error}); free some space and re-run: "
            f"training resumes from {resume}"
        ) from error
    if out_of_memory is not None:  # outside the handler: the traceback, and the failed trainer with it, is gone
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        retry = record_oom(plan, stage_dir)
        raise torch.OutOfMemoryError(
            f"{out_of_memory} (micro-batch {plan.micro_batch}; the retry uses {retry.micro_batch})"
        )
    return _saved(trainer, spec, plan, stage_dir)


def _trained(spec: TrainerSpec, plan: TrainingPlan, checkpoints: Path, callbacks: list | None):
    """The stage's trainer, built for the plan and trained to the end (resumed where a checkpoint is)."""
    if plan.device_kind == "cpu":
        keep_freed_memory()
    set_seed(spec.seed)  # before the model loads: a new head and the LoRA weights start the same every run
    if torch.cuda.is_available():  # this stage's own peak, from its model load on
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(spec, plan, checkpoints, callbacks)
    keep_trainable_dtype(trainer.model, plan)
    if TaskRunContext.get():  # in a Prefect task: show progress in the UI
        trainer.add_callback(PrefectProgress(spec.stage))
    resume_from = resume_point(checkpoints)
    if resume_from and is_main_process():
        log.warning("%s: resuming from %s", spec.stage, Path(resume_from).name)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def _saved(trainer, spec: TrainerSpec, plan: TrainingPlan, stage_dir: Path) -> FitResult:
    """Evaluate (if asked), save the adapter, and write what later stages and the recording step read
    (fit.json); the checkpoints go unless kept."""
    metrics = numeric(trainer.evaluate()) if spec.eval_data else {}
    adapter_dir = stage_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # every rank: sharded strategies gather the adapter here
    args = trainer.args
    result = FitResult(
        adapter_dir=str(adapter_dir),
        metrics=metrics,
        train_examples=len(trainer.train_dataset),
        processes=args.world_size,
        replica_checksums=replica_checksums(trainer),
        global_step=trainer.state.global_step,
        global_batch=args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        history=trainer.state.log_history,
        plan=plan,
        arguments={key: redact(str(value))[:500] for key, value in args.to_dict().items()},
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    )
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        if len(set(result.replica_checksums)) > 1:
            log.error(
                "the ranks' adapters differ after training (%s): gradients were not synchronised",
                result.replica_checksums,
            )
        (stage_dir / FIT_RECORD).write_text(result.model_dump_json())
        if not spec.keep_checkpoints:
            shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    return result


GPU_TAG = "gpu"  # on every training task: the tag whose concurrency limit bounds training at once
# Other tasks carry no tags: Prefect asks the server for slots of every tag a task run has, and on SQLite
# that request is often answered "database is locked" and retried 2 s later, even where no limit exists.


def training_task(name: str, **options):
    """The Prefect task settings every trainer shares: retries for transient failures (not for user
    errors), the `gpu` tag for concurrency limits, and the stage's key as its cache key."""
    return task(
        name=name,
        retries=2,
        retry_delay_seconds=[10, 60],
        retry_condition_fn=retry_unless_user_error,
        tags=[GPU_TAG, "training"],
        cache_policy=STAGE_CACHE,
        persist_result=True,
        **options,
    )
