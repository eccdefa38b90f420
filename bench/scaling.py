"""Memory and time of the book's DPO stage on 1, 2 and 8 GPUs under each strategy, for TinyLlama-1.1B,
a 7B and a 70B Llama: computed, not measured (the figures behind the README's scaling note).

    .venv/bin/python bench/scaling.py                 # H100 80 GB, bf16
    .venv/bin/python bench/scaling.py --gpu-memory-gib 40 --peak-tflops 312 --link-gbs 300   # A100 40 GB

Memory per GPU is the training plan's own estimate (tasks/plan.py `estimate_memory`: weights,
adapter + its optimizer, activations with checkpointing, LM head, overhead), with the book's settings
(LoRA r=64, max_length 512, effective batch 8, gradient checkpointing) split over the processes.
Time per optimizer step = max(compute, communication):
  compute = tokens x 8N / (GPUs x peak x MFU)   8N per token: policy forward 2N, backward through the
            frozen weights 2N, the checkpointed forward again 2N, the reference's forward 2N;
            tokens = 8 pairs x 2 sequences x 512 (padded, an upper bound)
  MFU: calibrated on the H100 measurements of the book's DPO on a TinyLlama-sized model (same
            accounting, 8192 tokens a step): QLoRA nf4 + checkpointing 2.7 s/step -> 0.027; bf16 LoRA
            without checkpointing (6N) 0.34 s/step -> 0.16. Larger matmuls use a card better, so for
            7B and 70B these are pessimistic.
  communication (FSDP, ZeRO-3) = 3 all-gathers of the weights per micro-batch (forward, recompute,
            backward) x (N-1)/N x weight bytes / link bandwidth; DDP and ZeRO-2 move only the LoRA
            gradients (megabytes), ignored.
The model shapes come from their configurations on the meta device: no weights are downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import LlamaConfig  # noqa: E402

from tasks.distributed import SHARDS_WEIGHTS  # noqa: E402
from tasks.plan import NF4_BYTES, DeviceSpec, ModelShape, plan_stage  # noqa: E402
from tasks.settings.models import LoraSettings, ModelSettings, QuantizationSettings  # noqa: E402
from tasks.settings.plan import DistributedSettings, PlanSettings  # noqa: E402
from tasks.settings.training import PolicySettings  # noqa: E402

MODELS = {  # published configurations (TinyLlama-1.1B, Llama-2-7B, Llama-2-70B)
    "1.1B": LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "7B": LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "70B": LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
}
BOOK_DPO = PolicySettings(
    max_steps=200,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,
    max_length=512,
    activation_checkpointing=True,
    optim="adamw_torch",
    lora=LoraSettings(
        r=64,
        alpha=32,
        dropout=0.1,
        target_modules=["k_proj", "gate_proj", "v_proj", "up_proj", "q_proj", "o_proj", "down_proj"],
    ),
)
STRATEGIES = ["ddp", "deepspeed_zero2", "fsdp", "deepspeed_zero3"]


def step_seconds(
    shape: ModelShape,
    quantized: bool,
    gpus: int,
    strategy: str,
    micro_batches: int,
    peak_tflops: float,
    mfu: float,
    link_gbs: float,
) -> float:
    tokens = BOOK_DPO.per_device_train_batch_size * BOOK_DPO.gradient_accumulation_steps * 2 * BOOK_DPO.max_length
    compute = tokens * 8 * shape.parameters / (gpus * peak_tflops * 1e12 * mfu)
    if gpus == 1 or strategy not in SHARDS_WEIGHTS:
        return compute
    weight_bytes = (
        shape.quantizable_parameters * NF4_BYTES * 2 if quantized else shape.parameters * 2
    )  # 4-bit stored in bf16
    return max(compute, 3 * micro_batches * weight_bytes * (gpus - 1) / gpus / (link_gbs * 1e9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.16, help="model FLOPs utilisation with 16-bit weights")
    parser.add_argument("--mfu-nf4", type=float, default=0.027, help="model FLOPs utilisation with 4-bit weights")
    parser.add_argument(
        "--link-gbs", type=float, default=450.0, help="GPU-to-GPU bandwidth per GPU, GB/s (NVLink 4: 450)"
    )
    args = parser.parse_args()
    device = DeviceSpec.described_gpu(args.gpu_memory_gib, bf16=True)
    print(
        f"book DPO stage (LoRA r=64, 512 tokens, 8 pairs/step, 200 steps) on {args.gpu_memory_gib:g} GiB GPUs, "
        f"{args.peak_tflops:g} TFLOP/s x MFU {args.mfu} (bf16) / {args.mfu_nf4} (nf4), links {args.link_gbs:g} GB/s\n"
    )
    print(
        "| model | weights | GPUs | strategy | micro x accum x GPUs | GiB per GPU | fits | s/step | 200 steps (min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, config in MODELS.items():
        shape = ModelShape.from_config(config)
        for quantized in (True, False):
            model = ModelSettings(
                precision="bf16",
                quantization=QuantizationSettings(mode="4bit" if quantized else "none", compute_dtype="bfloat16"),
            )
            for gpus in (1, 2, 8):
                for strategy in ["ddp"] if gpus == 1 else STRATEGIES:
                    plan = plan_stage(
                        "dpo",
                        "dpo",
                        BOOK_DPO,
                        model,
                        shape,
                        device,
                        PlanSettings(mode="recipe"),
                        distributed=DistributedSettings(num_processes=gpus, strategy=strategy),
                    )
                    seconds = step_seconds(
                        shape,
                        quantized,
                        gpus,
                        strategy,
                        plan.gradient_accumulation,
                        args.peak_tflops,
                        args.mfu_nf4 if quantized else args.mfu,
                        args.link_gbs,
                    )
                    fits = "yes" if plan.memory.total_gib <= plan.memory_budget_gib else "no"
                    print(
                        f"| {name} | {'nf4' if quantized else 'bf16'} | {gpus} | {strategy if gpus > 1 else 'single'} "
                        f"| {plan.micro_batch} x {plan.gradient_accumulation} x {gpus} | {plan.memory.total_gib:.1f} "
                        f"| {fits} | {seconds:.2f} | {seconds * 200 / 60:.1f} |"
                    )


if __name__ == "__main__":
    main()
