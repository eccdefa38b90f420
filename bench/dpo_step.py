"""DPO and reward-model training throughput on this machine: seconds per step, pairs/s, peak memory.

    .venv/bin/python bench/dpo_step.py [--steps 6] [--batch 2] [--max-length 128] [--profile quickstart]

Uses the profile's model (default: the real SmolLM2-135M), generated pairs and this machine's auto
training plan (tasks/plan.py); prints one line per stage. `bench/gpu.py` compares plans with plain TRL.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from flows.config import load_config  # noqa: E402
from tasks.data import DataSettings, apply_filter, format_split, load, split  # noqa: E402
from tasks.models import ResolvedModel, load_tokenizer, resolve_model_path  # noqa: E402
from tasks.plan import default_plan, keep_freed_memory  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step; the first is dropped as warm-up."""

    def __init__(self):
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._start)


def run(stage: str, trainer_class, config_class, settings, model_settings, model_path, pairs, out: Path, extra: dict):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tasks.trainer import config_arguments, load_pairs
    from tasks.training import keep_trainable_dtype

    head = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    tokenizer = load_tokenizer(model_path, model_settings)
    plan = default_plan(stage, stage, settings, ResolvedModel(path=model_path, settings=model_settings))
    model = head.from_pretrained(
        model_path, **({"num_labels": 1} if stage == "reward" else {}), **plan.load_kwargs(model_settings)
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    config = f"{config_class.__module__}.{config_class.__name__}"
    args = (
        config_arguments(settings, config, stage)
        | plan.trainer_overrides()
        | {"output_dir": str(out / stage), "report_to": [], "save_strategy": "no", "disable_tqdm": True}
        | extra
    )
    timer = StepTimer()
    trainer = trainer_class(
        model=model,
        args=config_class(**args),
        train_dataset=load_pairs(pairs.train.path),
        processing_class=tokenizer,
        peft_config=settings.lora.peft_config(
            "SEQ_CLS" if stage == "reward" else "CAUSAL_LM", model.config.num_hidden_layers
        ),
        callbacks=[timer],
    )
    keep_trainable_dtype(trainer.model, plan)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steady = timer.durations[1:] or timer.durations
    per_step = sum(steady) / len(steady)
    pairs_per_step = plan.effective_batch
    gpu = f", peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else ""
    print(
        f"{stage:6s} {per_step:6.2f} s/step  {pairs_per_step / per_step:6.2f} pairs/s  "
        f"({plan.adapter} {plan.precision}, batch {plan.micro_batch} x accum {plan.gradient_accumulation}, "
        f"{len(steady)} timed steps){gpu}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quickstart")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    shape = [
        f"{stage}.{key}={value}"
        for stage in ("policy", "rewards.helpfulness")
        for key, value in (
            ("max_steps", args.steps),
            ("per_device_train_batch_size", args.batch),
            ("gradient_accumulation_steps", 1),
            ("max_length", args.max_length),
        )
    ]
    config = load_config(args.profile, overrides=shape + args.overrides)
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    started = time.perf_counter()
    model_path = resolve_model_path(config.model)
    print(f"model {config.model.base_model} -> {model_path} ({time.perf_counter() - started:.1f} s)")
    print(f"torch threads {torch.get_num_threads()}; freed memory kept in the heap: {keep_freed_memory()}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data = DataSettings(synthetic_rows=max(64, 4 * args.steps * args.batch))
        report = apply_filter(load(data, out), data, out)
        pairs = format_split(split(report, data, out), load_tokenizer(model_path, config.model), out)
        run("dpo", DPOTrainer, DPOConfig, config.policy, config.model, model_path, pairs, out, {})
        run(
            "reward",
            RewardTrainer,
            RewardConfig,
            config.rewards["helpfulness"],
            config.model,
            model_path,
            pairs,
            out,
            {},
        )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
