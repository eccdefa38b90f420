"""Held-out accuracy of a reward model trained on a preference file: the figure a reward aspect is judged by.

    .venv/bin/python bench/reward_accuracy.py <folder>/orca_dpo_pairs.sample.jsonl --steps 60
    .venv/bin/python bench/reward_accuracy.py <folder>/hh_rlhf_harmless_base.sample.jsonl --max-length 256

Trains the profile's reward model (default: the quickstart's, on the real SmolLM2-135M) on the file's
train split and prints pairwise accuracy, mean margin and accuracy by prompt length on its held-out split.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from flows.config import load_config  # noqa: E402
from tasks.data import DataSettings, apply_filter, format_split, load, read_jsonl, split  # noqa: E402
from tasks.evaluate import RewardScorer, pairwise_metrics  # noqa: E402
from tasks.models import ResolvedModel, load_tokenizer, resolve_model_path  # noqa: E402
from tasks.reward import train_reward_model  # noqa: E402
from tasks.tracking import TrackingSettings, configure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("--profile", default="quickstart")
    parser.add_argument("--aspect", default="helpfulness")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--eval-fraction", type=float, default=0.15)
    args = parser.parse_args()
    config = load_config(args.profile)
    settings = config.rewards[args.aspect].model_copy(update={
        "max_steps": args.steps, "per_device_train_batch_size": args.batch, "max_length": args.max_length,
        "learning_rate": args.learning_rate, "save_steps": args.steps, "data": None})
    data = DataSettings(source=args.source, eval_fraction=args.eval_fraction)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        configure(TrackingSettings(tracking_uri=f"sqlite:///{out / 'mlflow.db'}"))
        model_path = resolve_model_path(config.model)
        report = apply_filter(load(data, out), data, out)
        pairs = format_split(split(report, data, out), load_tokenizer(model_path, config.model), out)
        started = time.perf_counter()
        result = train_reward_model(args.aspect, settings, ResolvedModel(path=model_path, settings=config.model), pairs, out / "reward")
        seconds = time.perf_counter() - started
        metrics, _, _ = pairwise_metrics(args.aspect, RewardScorer(result.model_dir, args.max_length),
                                         read_jsonl(pairs.eval.path), 8)
    print(f"data     {args.source}: {report.rows_in} rows, {report.rows} kept, {pairs.train.rows} train / "
          f"{pairs.eval.rows} held out (dropped: { {k: v for k, v in report.dropped.items() if v} })")
    print(f"settings {config.model.base_model}, LoRA r={settings.lora.r}, {args.steps} steps x batch {args.batch}, "
          f"lr {args.learning_rate}, max_length {args.max_length}; trained in {seconds:.0f} s")
    for name, value in metrics.items():
        print(f"{name:40s} {value:.3f}")


if __name__ == "__main__":
    main()
