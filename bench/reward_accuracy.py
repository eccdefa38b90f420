"""Held-out accuracy of a reward model trained on a preference file: the figure a reward aspect is judged by.

    .venv/bin/python bench/reward_accuracy.py <folder>/orca_dpo_pairs.sample.jsonl --steps 60
    .venv/bin/python bench/reward_accuracy.py <folder>/hh_rlhf_harmless_base.sample.jsonl \
        --profile sample-data --aspect harmlessness --max-length 128 --batch 8 --seeds 42 43 44

Trains the profile's reward model for the aspect (default: the quickstart's helpfulness judge, on the
real SmolLM2-135M) on the file's train split and prints pairwise accuracy with its 95 % interval, mean
margin and accuracy by prompt length on its held-out split. Every setting not given on the command
line is the profile's; the pairs are shortened to max_length as the pipeline does (tasks/data.py
`fit_pair`), so the trainer trains on all of them, and the held-out pairs are scored as the
evaluation stage scores them. One line per seed starts with `RESULT` (JSON) for tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from flows.config import load_config  # noqa: E402
from tasks.data import apply_filter, format_split, load, read_jsonl, split  # noqa: E402
from tasks.models import ResolvedModel, load_tokenizer, resolve_model_path  # noqa: E402
from tasks.reward import train_reward_model  # noqa: E402
from tasks.scoring import RewardScorer, pairwise_metrics  # noqa: E402
from tasks.settings.data import DataSettings  # noqa: E402
from tasks.settings.tracking import TrackingSettings  # noqa: E402
from tasks.tracking import configure  # noqa: E402


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("--profile", default="quickstart")
    parser.add_argument("--aspect", default="helpfulness")
    parser.add_argument("--steps", type=int, help="max_steps (default: the profile's)")
    parser.add_argument("--batch", type=int, help="pairs per step (default: the profile's)")
    parser.add_argument("--max-length", type=int, help="tokens per rendered pair (default: the profile's)")
    parser.add_argument("--learning-rate", "--lr", type=float, help="default: the profile's")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (alpha stays 2r); default: the profile's")
    parser.add_argument("--top-layers", type=int, help="LoRA in the top N decoder layers only; 0: all layers")
    parser.add_argument(
        "--eval-fraction", type=float, help="held-out share (default: the aspect's own data settings, else 0.15)"
    )
    parser.add_argument("--split-seed", type=int, help="seed of the question split (default: the data settings')")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds, one run each (default: the profile's)")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    config = load_config(args.profile)
    base = config.rewards[args.aspect]
    lora = base.lora.model_copy(
        update={
            key: value
            for key, value in {"r": args.lora_r, "alpha": 2 * args.lora_r if args.lora_r else None}.items()
            if value is not None
        }
    )
    if args.top_layers is not None:
        lora = lora.model_copy(update={"top_layers": args.top_layers or None})
    given = {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "max_length": args.max_length,
        "learning_rate": args.learning_rate,
    }
    settings = base.model_copy(
        update={key: value for key, value in given.items() if value is not None} | {"lora": lora, "data": None}
    )
    settings = settings.model_copy(update={"save_steps": settings.max_steps})
    data = (base.data or DataSettings(source=args.source, eval_fraction=0.15)).model_copy(
        update={"source": args.source}
    )
    data = data.model_copy(
        update={
            key: value
            for key, value in {"eval_fraction": args.eval_fraction, "seed": args.split_seed}.items()
            if value is not None
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        configure(TrackingSettings(tracking_uri=f"sqlite:///{out / 'mlflow.db'}"))
        model_path = resolve_model_path(config.model)
        report = apply_filter(load(data, out), data, out)
        pairs = format_split(
            split(report, data, out), load_tokenizer(model_path, config.model), out, settings.max_length, data.overlong
        )
        held_out = read_jsonl(pairs.eval.path)
        print(
            f"data     {args.source}: {report.rows_in} rows, {report.rows} kept, {pairs.train.rows} train / "
            f"{pairs.eval.rows} held out (split seed {data.seed}); shortened to {settings.max_length} tokens: "
            f"{pairs.overlong} (answers cut: {pairs.truncated_answers})"
        )
        print(
            f"settings {config.model.base_model}, LoRA r={lora.r} top_layers={lora.top_layers}, "
            f"{settings.max_steps} steps x batch {settings.per_device_train_batch_size}, "
            f"lr {settings.learning_rate}, max_length {settings.max_length}",
            flush=True,
        )
        for seed in args.seeds or [settings.seed]:
            started, cpu_started = time.perf_counter(), time.process_time()
            result = train_reward_model(
                args.aspect,
                settings.model_copy(update={"seed": seed}),
                ResolvedModel(path=model_path, settings=config.model),
                pairs,
                out / f"reward-{seed}",
            )
            # Training, saving and merging the adapter: the stage's cost. CPU seconds (all threads) say
            # what it costs on a machine others share, where wall time says more about them than about it.
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            metrics, _, _ = pairwise_metrics(
                args.aspect, RewardScorer(result.model_dir, config.evaluation.max_length), held_out, 8
            )
            name = f"{args.aspect}.pairwise_accuracy"
            print(
                f"seed {seed}: trained in {seconds:.0f} s ({cpu_seconds:.0f} CPU s, {torch.get_num_threads()} threads)"
            )
            for key, value in metrics.items():
                print(f"  {key:40s} {value:.3f}")
            print(
                "RESULT "
                + json.dumps(
                    {
                        "seed": seed,
                        "split_seed": data.seed,
                        "steps": settings.max_steps,
                        "batch": settings.per_device_train_batch_size,
                        "max_length": settings.max_length,
                        "lr": settings.learning_rate,
                        "lora_r": lora.r,
                        "top_layers": lora.top_layers,
                        "train_pairs": pairs.train.rows,
                        "eval_pairs": pairs.eval.rows,
                        "train_s": round(seconds, 1),
                        "train_cpu_s": round(cpu_seconds, 1),
                        "threads": torch.get_num_threads(),
                        "accuracy": round(metrics[name], 3),
                        "ci_low": round(metrics[f"{name}.ci_low"], 3),
                        "ci_high": round(metrics[f"{name}.ci_high"], 3),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
