"""DPO throughput of plain TRL with the book's settings against preftune's `recipe` and `auto` plans,
in one process on one device: s/step, pairs/s, tokens/s, TFLOP/s, MFU and peak memory.

    .venv/bin/python bench/gpu.py --data orca_dpo_pairs.sample.jsonl   # TinyLlama-sized random Llama (a GPU)
    .venv/bin/python bench/gpu.py --size tiny --steps 3           # seconds on a CPU (what CI runs)
    .venv/bin/python bench/gpu.py --record bench/RESULTS.md       # also append the table there

Plain TRL is the book's code on current TRL with one fix: bf16 instead of fp16 where the card has it
(fp16 on a 4-bit model crashes), fp32 on a CPU. The model is randomly initialised (throughput does
not depend on the weights); the data is a preference file (`--data`), else generated pairs.
FLOPs follow TRL's `compute_flops_per_token` (6N-style, non-causal attention), plus one forward for
the reference model; MFU uses TRL's table of peak dense FLOPs.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from flows.config import load_config  # noqa: E402
from tasks.data import apply_filter, format_split, load, split  # noqa: E402
from tasks.models import ResolvedModel, build_random_model, load_tokenizer, resolve_model_path  # noqa: E402
from tasks.plan import DeviceSpec, keep_freed_memory, plan_stage, shape_of  # noqa: E402
from tasks.policy import train_policy_adapter  # noqa: E402
from tasks.settings.data import DataSettings  # noqa: E402
from tasks.settings.models import RandomInitSettings, TokenizerSettings  # noqa: E402
from tasks.settings.plan import PlanSettings  # noqa: E402
from tasks.settings.tracking import TrackingSettings  # noqa: E402
from tasks.tracking import configure  # noqa: E402
from tasks.trainer import load_pairs  # noqa: E402

SIZES = {
    "tinyllama": RandomInitSettings(
        hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632
    ),
    "tiny": RandomInitSettings(),
}


class StepMeter(TrainerCallback):
    """Wall time and tokens of each optimizer step, and peak memory over the run."""

    def __init__(self, warmup: int):
        self.warmup, self.durations, self.tokens, self.peak_rss = warmup, [], [], 0
        self._start, self._sampling = 0.0, True
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def _sample_rss(self):
        process = psutil.Process()
        while self._sampling:
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            time.sleep(0.05)

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.durations.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            self.tokens.append(float(logs["num_tokens"]))

    def stop(self):
        self._sampling = False


def plain_trl(model_dir: str, tokenizer, train_path: str, steps: int, meter: StepMeter, out: Path):
    """The book's DPO cell on current TRL, written against TRL directly (no preftune code)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float16,
        bnb_4bit_use_double_quant=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb, device_map={"": 0} if cuda else "cpu"
    )
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        optim="paged_adamw_32bit",
        learning_rate=1e-5,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        max_steps=steps,
        logging_steps=1,
        activation_checkpointing=True,
        beta=0.1,
        max_length=512,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        fp16=False,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=64,
        lora_alpha=32,
        lora_dropout=0.1,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=load_pairs(train_path),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[meter],
    )
    trainer.train()
    return "qlora-nf4 bf16 2x4 ckpt paged_adamw_32bit" if args.bf16 else "qlora-nf4 fp32 2x4 ckpt paged_adamw_32bit"


def measure(name: str, run, meter: StepMeter, config, peak_flops: float | None) -> dict:
    """Run one variant; figures from the steady steps (after warm-up)."""
    from trl.trainer.utils import compute_flops_per_token

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    label = run()
    meter.stop()
    steady = meter.durations[meter.warmup :]
    seconds = sum(steady) / len(steady)
    tokens = (meter.tokens[-1] - (meter.tokens[meter.warmup - 1] if meter.warmup else 0)) / len(steady)
    per_sequence = max(1, round(tokens / 16))  # 8 pairs = 16 sequences (chosen and rejected) per step
    # Policy forward + backward (TRL's count), plus the reference model's forward (a third of it).
    flops = tokens * compute_flops_per_token(config, per_sequence) * 4 / 3 / seconds
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else meter.peak_rss
    return {
        "variant": name,
        "plan": label,
        "s/step": seconds,
        "pairs/s": 8 / seconds,
        "tokens/s": tokens / seconds,
        "TFLOP/s": flops / 1e12,
        "MFU %": 100 * flops / peak_flops if peak_flops else None,
        "peak GiB": peak / 2**30,
        "steps": len(steady),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tinyllama")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant (8 pairs each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--data",
        default="synthetic",
        help="a preference file (e.g. the orca_dpo_pairs sample), or generated pairs (default)",
    )
    parser.add_argument("--tokenizer", help="a folder with a chat-template tokenizer (default: the quickstart model's)")
    parser.add_argument("--variants", default="plain-trl,recipe,auto")
    parser.add_argument("--record", help="append the results as Markdown to this file")
    parser.add_argument("--json", help="also write the results (and each plan's memory estimate) as JSON here")
    args = parser.parse_args()
    from transformers import AutoConfig
    from trl.trainer.utils import get_peak_flops

    book = load_config("book")
    tokenizer_source = args.tokenizer or resolve_model_path(load_config("quickstart").model)
    model_dir = str(build_random_model(tokenizer_source, SIZES[args.size]))
    # The book's model settings on a random model with a local tokenizer (no hub): its own chat template.
    model = book.model.model_copy(update={"base_model": model_dir, "tokenizer": TokenizerSettings()})
    tokenizer = load_tokenizer(model_dir, model)
    config, shape, device = AutoConfig.from_pretrained(model_dir), shape_of(model, model_dir), DeviceSpec.detect()
    if device.kind == "cpu":  # what preftune's CPU plans do; process-wide, so every variant gets it
        keep_freed_memory()
    peak_flops = get_peak_flops(device.name, "bfloat16") if device.kind == "cuda" else None
    total_steps = args.warmup + args.steps
    settings = book.policy.model_copy(update={"max_steps": total_steps, "logging_steps": 1, "save_steps": 10_000})
    rows, estimates = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        configure(TrackingSettings(tracking_uri=f"sqlite:///{out / 'mlflow.db'}"))
        data = DataSettings(source=args.data, eval_fraction=0.1)
        pairs = format_split(split(apply_filter(load(data, out), data, out), data, out), tokenizer, out, 512)
        print(
            f"device {device.name} ({device.kind}, {device.memory_gib:.1f} GiB free); model random Llama "
            f"{shape.parameters / 1e9:.2f}B; data {args.data}: {pairs.train.rows} train pairs; "
            f"{args.steps} timed steps of 8 pairs after {args.warmup}",
            flush=True,
        )

        def variant(name: str, meter: StepMeter):
            if name == "plain-trl":
                return lambda: plain_trl(model_dir, tokenizer, pairs.train.path, total_steps, meter, out / name)
            plan = plan_stage("dpo", "dpo", settings, model, shape, device, PlanSettings(mode=name))
            estimates[name] = plan.memory.total_gib

            def run():
                train_policy_adapter(
                    "dpo",
                    settings,
                    ResolvedModel(path=model_dir, settings=model),
                    pairs,
                    out / name,
                    plan=plan,
                    callbacks=[meter],
                )
                return (
                    f"{plan.adapter} {plan.precision} {plan.micro_batch}x{plan.gradient_accumulation} "
                    f"{'ckpt' if plan.gradient_checkpointing else 'no-ckpt'} {plan.optim}"
                )

            return run

        for name in args.variants.split(","):
            meter = StepMeter(args.warmup)
            rows.append(
                measure(name, variant(name, meter), meter, config, peak_flops) | {"estimated GiB": estimates.get(name)}
            )
            print(format_row(rows[-1], rows[0]), flush=True)
            gc.collect()
    table = markdown(rows, device, shape, args)
    print(table)
    if args.record:
        with open(args.record, "a") as handle:
            handle.write(table + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"device": device.model_dump(), "parameters": shape.parameters, "warmup": args.warmup, "rows": rows},
                indent=2,
            )
            + "\n"
        )


def format_row(row: dict, baseline: dict) -> str:
    mfu = f"{row['MFU %']:.1f}" if row["MFU %"] is not None else "n/a"
    return (
        f"{row['variant']:10s} {row['s/step']:8.3f} s/step {row['pairs/s']:8.2f} pairs/s {row['tokens/s']:10.0f} tok/s "
        f"{row['TFLOP/s']:8.2f} TFLOP/s  MFU {mfu:>5s} %  peak {row['peak GiB']:6.2f} GiB  "
        f"x{baseline['s/step'] / row['s/step']:.2f} vs {baseline['variant']}  [{row['plan']}]"
    )


def markdown(rows: list[dict], device: DeviceSpec, shape, args) -> str:
    command = "python bench/gpu.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    lines = [
        f"### {datetime.date.today()} · {device.name} ({device.kind}) · `{command}`",
        "",
        f"Random Llama {shape.parameters / 1e9:.2f}B, DPO, book settings (effective batch 8, max_length 512), "
        f"{rows[0]['steps']} timed steps after {args.warmup}, data `{Path(args.data).name}`. "
        f"Peak memory: {'GPU allocated' if device.kind == 'cuda' else 'process RSS (cumulative)'}."
        + (
            " On a CPU every variant runs with freed memory kept in the heap (`keep_freed_memory`)."
            if device.kind == "cpu"
            else ""
        ),
        "",
        "| variant | plan | s/step | pairs/s | tokens/s | TFLOP/s | MFU % | peak GiB | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mfu = f"{row['MFU %']:.1f}" if row["MFU %"] is not None else "n/a"
        lines.append(
            f"| {row['variant']} | {row['plan']} | {row['s/step']:.3f} | {row['pairs/s']:.2f} | "
            f"{row['tokens/s']:.0f} | {row['TFLOP/s']:.2f} | {mfu} | {row['peak GiB']:.2f} | "
            f"{rows[0]['s/step'] / row['s/step']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
