"""The training plan: how one training stage runs on this device, decided in one place and logged.

`recipe` runs the profile's settings verbatim; only the precision is fitted to the card, because the
recipe's fp16 on a 4-bit model no longer runs under current TRL (it casts QLoRA weights to bf16, and
fp16's gradient scaler cannot unscale bf16 gradients). `auto` keeps everything that changes the result
(effective batch, learning rate and schedule, steps, beta, LoRA rank/alpha/targets) and fits the rest
(quantization, micro-batch x accumulation, gradient checkpointing, optimizer implementation, attention
kernel) to the device's free memory, from an estimate of peak memory. 4-bit is chosen only where
16-bit weights would not fit. The OOM retry in `tasks/training.py` stays the safety net.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import mlflow
import torch
from prefect import task
from pydantic import BaseModel, Field

from tasks.base import PreftuneError, StrictModel, retry_unless_user_error
from tasks.distributed import SHARDS_TRAINING_STATE, SHARDS_WEIGHTS
from tasks.models import ResolvedModel
from tasks.settings.models import LoraSettings, ModelSettings
from tasks.settings.plan import DistributedSettings, PlanSettings

GiB = 2**30
# What a stage trains, for the memory model: DPO-style pairs with a reference (dpo), KTO's example plus
# its mismatched KL example (kto), reference-free pairs (pairs: ORPO, SimPO), online RL on generated
# completions (online), reward models, SFT.
Kind = Literal["dpo", "kto", "pairs", "online", "reward", "sft"]
Precision = Literal["fp32", "fp16", "bf16"]
DType = Literal["float32", "float16", "bfloat16"]
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Sequences in one example: DPO and reward models run chosen and rejected, SFT one completion.
SEQUENCES = {"dpo": 2, "kto": 2, "pairs": 2, "online": 1, "reward": 2, "sft": 1}
# Kinds whose trainer never materialises the full logits (DPO's fused LM head, the reward head).
FUSED_HEAD = {"dpo", "reward"}
# Kinds whose TRL trainer can compute the reference log-probs once up front.
PRECOMPUTES_REFERENCE = {"dpo", "kto"}
# NF4 stores half a byte per weight, plus an fp32 absmax per 64 weights (double quantization
# shrinks that to 8 bits per 64 plus a second-level constant): ~0.516 bytes per weight.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Optimizer implementations that only help under memory pressure, or only on CUDA.
MEMORY_SAVING_OPTIMIZERS = ("paged_", "_8bit")


class DeviceSpec(StrictModel):
    """What a plan depends on: detected on this machine, or described for a card one does not have."""

    kind: Literal["cpu", "cuda"]
    name: str
    memory_gib: float = Field(gt=0)  # free memory training may use (GPU: free device memory; CPU: available RAM)
    bf16: bool  # native bf16 (Ampere and newer); fp16-only cards (T4, V100) train in fp16
    flash_attention: bool = False  # compute capability 8.0+ and the flash-attn package installed

    @classmethod
    def detect(cls) -> DeviceSpec:
        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            major, _ = torch.cuda.get_device_capability()
            return cls(
                kind="cuda",
                name=torch.cuda.get_device_name(),
                memory_gib=free / GiB,
                bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                flash_attention=major >= 8 and importlib.util.find_spec("flash_attn") is not None,
            )
        import psutil

        return cls(kind="cpu", name="cpu", memory_gib=psutil.virtual_memory().available / GiB, bf16=False)

    @classmethod
    def described_gpu(cls, memory_gib: float, bf16: bool, name: str | None = None) -> DeviceSpec:
        return cls(
            kind="cuda",
            name=name or f"described GPU ({memory_gib:g} GiB, {'bf16' if bf16 else 'fp16 only'})",
            memory_gib=memory_gib,
            bf16=bf16,
        )


class ModelShape(BaseModel):
    """What memory depends on, read from the model's configuration on the meta device (no weights)."""

    parameters: int
    quantizable_parameters: int  # the decoder's Linear weights: what bitsandbytes stores in 4 bits
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    kv_dim: int
    linear_features: dict[str, tuple[int, int]]  # projection name -> (in, out) features, per layer

    @classmethod
    def from_config(cls, config) -> ModelShape:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        features: dict[str, tuple[int, int]] = {}
        quantizable = 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
                features[name.split(".")[-1]] = (module.in_features, module.out_features)
                quantizable += module.weight.numel()
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            parameters=sum(p.numel() for p in model.parameters()),
            quantizable_parameters=quantizable,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            vocab_size=text.vocab_size,
            kv_dim=text.num_key_value_heads * head_dim,
            linear_features=features,
        )

    def lora_layers(self, lora: LoraSettings) -> int:
        """Decoder layers with adapters: the backward pass (and what autograd keeps) stops below them."""
        return min(lora.top_layers or self.num_layers, self.num_layers)

    def lora_parameters(self, lora: LoraSettings) -> int:
        per_layer = sum(
            lora.r * (i + o) for name, (i, o) in self.linear_features.items() if name in lora.target_modules
        )
        return per_layer * self.lora_layers(lora)

    def activation_elements(self, lora: LoraSettings) -> float:
        """Values autograd keeps per token per decoder layer when only LoRA trains, without checkpointing.
        Fitted to the tensors autograd actually saves (tests/test_plan.py checks it against a real model):
        ~7h + 3.5i + 2 kv_dim, plus 1.5x the input width of each LoRA target with dropout on."""
        elements = 7 * self.hidden_size + 3.5 * self.intermediate_size + 2 * self.kv_dim
        if lora.dropout > 0:
            elements += 1.5 * sum(i for name, (i, _) in self.linear_features.items() if name in lora.target_modules)
        return elements


class MemoryEstimate(BaseModel):
    weights_gib: float
    adapter_gib: float  # LoRA weights, gradients and Adam moments
    activations_gib: float
    head_gib: float  # LM head / loss buffers
    overhead_gib: float
    total_gib: float


class TrainingPlan(BaseModel):
    """Everything about how a stage trains that the profile does not fix, with the reasons."""

    stage: str
    mode: Literal["auto", "recipe"]
    device: str
    device_kind: Literal["cpu", "cuda"]
    precision: Precision  # the Trainer's mixed precision
    weights_dtype: DType  # frozen weights as loaded (4-bit: the non-quantized ones)
    quantization: Literal["none", "nf4", "fp4"]
    compute_dtype: DType | None  # 4-bit matmuls
    double_quant: bool
    trainable_dtype: DType  # LoRA weights: fp32 under fp16 so the gradient scaler works
    micro_batch: int  # per process
    gradient_accumulation: int
    effective_batch: int  # micro_batch x gradient_accumulation x processes: the profile's, whatever the processes
    processes: int = 1
    strategy: Literal["single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = "single"
    gradient_checkpointing: bool
    optim: str
    attn_implementation: str
    precompute_ref_log_probs: bool | None = None  # DPO and KTO only
    max_length: int
    memory: MemoryEstimate
    memory_budget_gib: float
    reasons: list[str]

    @property
    def adapter(self) -> str:
        return f"qlora-{self.quantization}" if self.quantization != "none" else f"lora-{self.weights_dtype}"

    def result_key(self) -> list[str]:
        """What changes the trained weights (not only the speed): part of the stage folder's key, so a
        stage trained in 4-bit on a GPU is never resumed in full precision on a CPU, or the reverse."""
        return [
            self.device_kind,
            self.precision,
            self.weights_dtype,
            self.quantization,
            str(self.compute_dtype),
            self.trainable_dtype,
        ]

    def trainer_overrides(self) -> dict:
        """The TRL/transformers config fields the plan decides."""
        overrides = dict(
            per_device_train_batch_size=self.micro_batch,
            gradient_accumulation_steps=self.gradient_accumulation,
            activation_checkpointing=self.gradient_checkpointing,
            optim=self.optim,
            bf16=self.precision == "bf16",
            fp16=self.precision == "fp16",
            use_cpu=self.device_kind == "cpu",
        )  # launched on a CPU: gloo, not a GPU backend
        if self.processes > 1:  # LoRA on frozen layers: DDP need not search the graph for unused parameters
            overrides["ddp_find_unused_parameters"] = False
        if self.precompute_ref_log_probs is not None:
            overrides["precompute_ref_log_probs"] = self.precompute_ref_log_probs
        return overrides

    def load_kwargs(self, model: ModelSettings) -> dict:
        """`from_pretrained` arguments: dtype, 4-bit config, attention kernel; safetensors only."""
        kwargs: dict = {
            "revision": model.revision,
            "trust_remote_code": model.trust_remote_code,
            "use_safetensors": True,
            "dtype": getattr(torch, self.weights_dtype),
            "attn_implementation": self.attn_implementation,
        }
        if self.quantization != "none":
            from transformers import BitsAndBytesConfig

            sharded = self.strategy in SHARDS_WEIGHTS
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.quantization,
                bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
                bnb_4bit_use_double_quant=self.double_quant,
                # FSDP / ZeRO-3 shard parameters of one dtype: the packed 4-bit weights are stored in it
                bnb_4bit_quant_storage=getattr(torch, self.compute_dtype) if sharded else torch.uint8,
            )
            if (
                not sharded
            ):  # each rank its own card (launchers set LOCAL_RANK); sharded ones are placed by the strategy
                kwargs["device_map"] = (
                    {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
                    if self.device_kind == "cuda"
                    else "cpu"
                )
        return kwargs

    def shrunk(self) -> TrainingPlan:
        """The next plan after an out-of-memory error: half the micro-batch (same effective batch), then
        gradient checkpointing; the user is told what else helps when neither is left."""
        if self.micro_batch > 1:
            update = {"micro_batch": self.micro_batch // 2, "gradient_accumulation": self.gradient_accumulation * 2}
        elif not self.gradient_checkpointing:
            update = {"gradient_checkpointing": True}
        else:
            raise PreftuneError(
                f"{self.stage}: out of memory at micro-batch 1 with gradient checkpointing: lower "
                "max_length, or train in 4-bit (model.quantization.mode: 4bit)"
            )
        return self.model_copy(update=update | {"reasons": self.reasons + [f"after an out-of-memory error: {update}"]})

    def params(self) -> dict[str, str]:
        """Flat `plan.<stage>.<field>` values for MLflow."""
        values = self.model_dump(exclude={"stage", "reasons", "memory"}) | {
            "estimated_peak_gib": round(self.memory.total_gib, 2),
            "adapter": self.adapter,
        }
        return {f"plan.{self.stage}.{key}": str(value) for key, value in values.items()}


class PrecisionChoice(BaseModel):
    precision: Precision
    weights_dtype: DType
    reason: str


def choose_precision(requested: str, device: DeviceSpec) -> PrecisionChoice:
    """The one place that decides mixed precision. bf16 wherever the card has it; fp16 on fp16-only cards
    (with trainable weights kept in fp32, see `TrainingPlan.trainable_dtype`); fp32 on a CPU."""
    if device.kind == "cpu":
        note = "" if requested in ("auto", "fp32") else f" ({requested} requested: no native {requested} on this CPU)"
        return PrecisionChoice(
            precision="fp32",
            weights_dtype="float32",
            reason="CPU: fp32, since bf16/fp16 run several times slower without native support" + note,
        )
    if requested == "fp32":
        return PrecisionChoice(precision="fp32", weights_dtype="float32", reason="fp32 requested")
    if device.bf16:
        note = (
            (
                " (fp16 requested: on a 4-bit model TRL keeps LoRA weights in bf16, which fp16's gradient scaler "
                "cannot unscale; bf16 has fp16's speed and fp32's range)"
            )
            if requested == "fp16"
            else ""
        )
        return PrecisionChoice(precision="bf16", weights_dtype="bfloat16", reason="bf16: the card supports it" + note)
    note = f" ({requested} requested)" if requested == "bf16" else ""
    return PrecisionChoice(
        precision="fp16",
        weights_dtype="float16",
        reason="fp16: the card has no bf16; LoRA weights stay fp32 so the gradient scaler works" + note,
    )


def estimate_memory(
    shape: ModelShape,
    lora: LoraSettings,
    kind: Kind,
    micro_batch: int,
    max_length: int,
    precision: Precision,
    weights_dtype: DType,
    quantized: bool,
    checkpointing: bool,
    trainable_dtype: DType,
    device_kind: str,
    processes: int = 1,
    strategy: str = "single",
) -> MemoryEstimate:
    """Peak memory of one training step on one process, from the model's shape (an upper bound: every
    sequence padded to max_length). FSDP and ZeRO-3 hold 1/N of the weights (plus one layer gathered
    at a time); FSDP and ZeRO-2/3 hold 1/N of the adapter's gradients and optimizer states."""
    tokens = micro_batch * max_length * SEQUENCES[kind]
    act_bytes = 4 if precision == "fp32" else 2
    other = shape.parameters - shape.quantizable_parameters
    weights = (
        shape.quantizable_parameters * NF4_BYTES + other * DTYPE_BYTES[weights_dtype]
        if quantized
        else shape.parameters * DTYPE_BYTES[weights_dtype]
    )
    adapter = shape.lora_parameters(lora) * (2 * DTYPE_BYTES[trainable_dtype] + 8)
    if processes > 1 and strategy in SHARDS_WEIGHTS:
        weights = weights / processes + weights / shape.num_layers  # a layer is gathered whole to compute
    if processes > 1 and strategy in SHARDS_TRAINING_STATE:
        adapter = shape.lora_parameters(lora) * DTYPE_BYTES[trainable_dtype] + adapter / processes
    per_layer = shape.activation_elements(lora) * act_bytes
    layers = shape.lora_layers(lora)
    if checkpointing:  # each layer's input is kept; one layer at a time is recomputed
        activations = tokens * (layers * shape.hidden_size * act_bytes + per_layer)
    else:
        activations = tokens * layers * per_layer
    # SFT and the others materialise the logits (and fp32 loss buffers); DPO's fused LM head and the reward head do not.
    head = tokens * shape.hidden_size * 4 if kind in FUSED_HEAD else tokens * shape.vocab_size * (act_bytes + 8)
    overhead = 0.5 * GiB if device_kind == "cuda" else 1.0 * GiB
    parts = [value / GiB for value in (weights, adapter, activations, head, overhead)]
    return MemoryEstimate(
        weights_gib=parts[0],
        adapter_gib=parts[1],
        activations_gib=parts[2],
        head_gib=parts[3],
        overhead_gib=parts[4],
        total_gib=sum(parts),
    )


def _micro_batches(effective: int) -> list[int]:
    """Micro-batch sizes that divide the effective batch, largest first."""
    return [size for size in range(effective, 0, -1) if effective % size == 0]


@dataclass
class StageToFit:
    """One stage's request, as both planners read it: what it trains, where, and its share of the batch."""

    stage: str
    kind: Kind
    settings: object  # the stage's TrainerSettings
    model: ModelSettings
    shape: ModelShape
    device: DeviceSpec
    plan_settings: PlanSettings
    precision: PrecisionChoice
    effective: int  # examples per optimizer step, over all processes
    processes: int
    strategy: str
    budget_gib: float
    precompute: bool | None  # DPO/KTO's precompute_ref_log_probs as the profile sets it
    reasons: list[str]

    @property
    def per_process(self) -> int:
        return self.effective // self.processes

    def build(
        self, micro: int, checkpointing: bool, quantized: bool, optim: str, attn: str, precompute: bool | None
    ) -> TrainingPlan:
        choice, quant, settings = self.precision, self.model.quantization, self.settings
        trainable: DType = "bfloat16" if quantized and choice.precision == "bf16" else "float32"
        memory = estimate_memory(
            self.shape,
            settings.lora,
            self.kind,
            micro,
            settings.max_length,
            choice.precision,
            choice.weights_dtype,
            quantized,
            checkpointing,
            trainable,
            self.device.kind,
            self.processes,
            self.strategy,
        )
        compute = quant.compute_dtype if self.plan_settings.mode == "recipe" else choice.weights_dtype
        if quantized and choice.precision == "fp16" and compute == "bfloat16":
            compute = "float16"
        return TrainingPlan(
            stage=self.stage,
            mode=self.plan_settings.mode,
            device=self.device.name,
            device_kind=self.device.kind,
            precision=choice.precision,
            weights_dtype=choice.weights_dtype,
            quantization=quant.quant_type if quantized else "none",
            compute_dtype=compute if quantized else None,
            double_quant=quant.double_quant and quantized,
            trainable_dtype=trainable,
            micro_batch=micro,
            gradient_accumulation=self.per_process // micro,
            effective_batch=self.effective,
            processes=self.processes,
            strategy=self.strategy,
            gradient_checkpointing=checkpointing,
            optim=optim,
            attn_implementation=attn,
            precompute_ref_log_probs=precompute,
            max_length=settings.max_length,
            memory=memory,
            memory_budget_gib=self.budget_gib,
            reasons=list(self.reasons),
        )


def plan_stage(
    stage: str,
    kind: Kind,
    settings,
    model: ModelSettings,
    shape: ModelShape,
    device: DeviceSpec,
    plan_settings: PlanSettings,
    train_pairs: int | None = None,
    distributed: DistributedSettings | None = None,
) -> TrainingPlan:
    """Fit one stage's training (its `TrainerSettings`) to `device`: one process's share of it when
    `distributed` launches several, with the same effective batch; `plan.mode` picks the planner."""
    choice = choose_precision(model.precision, device)
    effective = settings.per_device_train_batch_size * settings.gradient_accumulation_steps
    processes = distributed.num_processes if distributed else 1
    strategy = distributed.strategy if processes > 1 else "single"
    if effective % processes:
        raise PreftuneError(
            f"{stage}: the effective batch {effective} (per_device_train_batch_size x "
            f"gradient_accumulation_steps) does not divide over {processes} processes"
        )
    request = StageToFit(
        stage=stage,
        kind=kind,
        settings=settings,
        model=model,
        shape=shape,
        device=device,
        plan_settings=plan_settings,
        precision=choice,
        effective=effective,
        processes=processes,
        strategy=strategy,
        budget_gib=device.memory_gib * plan_settings.memory_fraction,
        precompute=getattr(settings, "precompute_ref_log_probs", None),
        reasons=[choice.reason],
    )
    if processes > 1:
        request.reasons.append(
            f"{processes} processes ({strategy}): each takes {request.per_process} of the "
            f"{effective} examples of an optimizer step"
        )
    return recipe_plan(request) if plan_settings.mode == "recipe" else auto_plan(request, train_pairs)


def recipe_plan(request: StageToFit) -> TrainingPlan:
    """The profile's batch, checkpointing, optimizer and quantization as they are; only precision is fitted."""
    settings, quant = request.settings, request.model.quantization
    quantized = quant.mode == "4bit" or (quant.mode == "auto" and request.device.kind == "cuda")
    request.reasons.append("recipe: batch, checkpointing, optimizer and quantization as the profile sets them")
    micro = min(settings.per_device_train_batch_size, request.per_process)
    if request.per_process % micro:
        raise PreftuneError(
            f"{request.stage}: {request.processes} processes of micro-batch {micro} cannot make the "
            f"effective batch {request.effective}"
        )
    plan = request.build(micro, settings.gradient_checkpointing, quantized, settings.optim, "sdpa", request.precompute)
    if plan.memory.total_gib > request.budget_gib:
        plan.reasons.append(
            f"estimated {plan.memory.total_gib:.1f} GiB exceeds the {request.budget_gib:.1f} GiB "
            "budget: expect the out-of-memory retry, or use plan.mode=auto"
        )
    return plan


def auto_plan(request: StageToFit, train_pairs: int | None) -> TrainingPlan:
    """What changes the result stays the profile's; the rest is fitted to the device's memory: 16-bit weights
    before 4-bit, no checkpointing before checkpointing, the largest micro-batch that fits first."""
    settings, device, quant, choice = request.settings, request.device, request.model.quantization, request.precision
    reasons, budget, per_process = request.reasons, request.budget_gib, request.per_process
    optim = settings.optim
    if any(marker in optim for marker in MEMORY_SAVING_OPTIMIZERS) or device.kind == "cuda":
        optim = "adamw_torch_fused" if device.kind == "cuda" else "adamw_torch"
        if optim != settings.optim:
            reasons.append(
                f"optimizer {settings.optim} -> {optim} (same AdamW update; paged/8-bit states only "
                "save memory, which is not short here)"
            )
    attn = "flash_attention_2" if device.flash_attention and choice.precision != "fp32" else "sdpa"
    precompute = request.precompute
    examples = settings.max_steps * request.effective
    if request.kind in PRECOMPUTES_REFERENCE and train_pairs and not precompute and examples >= train_pairs:
        precompute = True
        reasons.append(
            f"reference log-probs precomputed: {examples} examples over {train_pairs} train pairs, so "
            "one pass over the data is cheaper than a reference forward every step"
        )
    if quant.mode == "4bit":
        quantizations, why = [True], "4-bit: model.quantization.mode is 4bit"
    elif quant.mode == "none" or device.kind == "cpu":
        quantizations, why = (
            [False],
            f"{choice.weights_dtype} weights: "
            + ("model.quantization.mode is none" if quant.mode == "none" else "bitsandbytes 4-bit only pays on CUDA"),
        )
    else:
        quantizations, why = [False, True], ""
    micro_batches = _micro_batches(per_process)
    if device.kind == "cpu":  # a CPU's throughput per pair does not grow with the micro-batch (bench/dpo_step.py)
        micro_batches = [size for size in micro_batches if size <= settings.per_device_train_batch_size]
    smallest = None
    for quantized in quantizations:
        # Without checkpointing first (it recomputes every layer: ~1/3 more compute), largest micro-batch first.
        for checkpointing in (False, True):
            for micro in micro_batches:
                plan = request.build(micro, checkpointing, quantized, optim, attn, precompute)
                if plan.memory.total_gib <= budget:
                    plan.reasons.append(
                        why
                        or (
                            f"4-bit {quant.quant_type}: {choice.weights_dtype} weights do not fit"
                            if quantized
                            else f"{choice.weights_dtype} weights fit"
                        )
                    )
                    plan.reasons.append(
                        f"micro-batch {micro} x accumulation {per_process // micro}"
                        f"{f' x {request.processes} processes' if request.processes > 1 else ''}, "
                        f"checkpointing {'on' if checkpointing else 'off'}: estimated "
                        f"{plan.memory.total_gib:.1f} of {budget:.1f} GiB"
                    )
                    return plan
                smallest = plan if smallest is None or plan.memory.total_gib < smallest.memory.total_gib else smallest
    raise PreftuneError(
        f"{request.stage}: does not fit on {device.name} ({device.memory_gib:.1f} GiB free) even at "
        f"micro-batch 1 with checkpointing{' and 4-bit' if True in quantizations else ''} (estimated "
        f"{smallest.memory.total_gib:.1f} GiB): lower max_length ({settings.max_length}) or use a "
        "larger card"
    )


# --- Prefect tasks and reporting -------------------------------------------------------------


def shape_of(model: ModelSettings, model_path: str | None = None) -> ModelShape:
    from tasks.models import model_config

    return ModelShape.from_config(model_config(model, model_path))


@task(name="plan-training", task_run_name="plan-{stage}", retries=1, retry_condition_fn=retry_unless_user_error)
def plan_training(
    stage: str,
    kind: Kind,
    settings,
    model: ResolvedModel,
    plan_settings: PlanSettings,
    train_pairs: int | None = None,
    distributed: DistributedSettings | None = None,
) -> TrainingPlan:
    return plan_stage(
        stage,
        kind,
        settings,
        model.settings,
        shape_of(model.settings, model.path),
        DeviceSpec.detect(),
        plan_settings,
        train_pairs,
        distributed,
    )


def plan_table(plans: list[TrainingPlan]) -> list[dict]:
    return [
        {
            "stage": plan.stage,
            "device": plan.device,
            "precision": plan.precision,
            "adapter": plan.adapter,
            "micro-batch x accumulation": f"{plan.micro_batch} x {plan.gradient_accumulation}",
            "checkpointing": plan.gradient_checkpointing,
            "optimizer": plan.optim,
            "attention": plan.attn_implementation,
            "estimated peak GiB": f"{plan.memory.total_gib:.1f} of {plan.memory_budget_gib:.1f}",
            "why": "; ".join(plan.reasons),
        }
        for plan in plans
    ]


def publish_plans(plans: list[TrainingPlan]) -> None:
    """Every run shows what it will run: MLflow params on the parent run, and a Prefect table artifact;
    the policy's plan (the last) also tags the run with its device, adapter and precision."""
    from prefect.artifacts import create_table_artifact

    policy = plans[-1]
    mlflow.log_params({key: value for plan in plans for key, value in plan.params().items()})
    mlflow.set_tags(
        {
            "preftune.device": policy.device,
            "preftune.adapter": policy.adapter,
            "preftune.precision": policy.precision,
            "preftune.plan": policy.mode,
        }
    )
    create_table_artifact(
        key="training-plan", table=plan_table(plans), description=f"{plans[0].mode} training plan on {plans[0].device}"
    )


def inference_placement() -> tuple[str, torch.dtype]:
    """Where scoring and generation run: the GPU when there is one, in its 16-bit dtype, else the CPU
    in fp32. Merges use the same device in fp32 (merging into 16-bit weights would round them)."""
    if not torch.cuda.is_available():
        return "cpu", torch.float32
    return "cuda", getattr(torch, choose_precision("auto", DeviceSpec.detect()).weights_dtype)


def default_plan(
    stage: str,
    kind: Kind,
    settings,
    model: ResolvedModel,
    train_pairs: int | None = None,
    distributed: DistributedSettings | None = None,
) -> TrainingPlan:
    """The auto plan on this machine, for a stage called outside the flow (scripts, benchmarks, tests)."""
    return plan_training.fn(stage, kind, settings, model, PlanSettings(), train_pairs, distributed)


def keep_freed_memory() -> bool:
    """On a CPU, glibc hands every large freed block back to the OS and faults it in again on the next
    allocation; TRL's tiled LM head allocates such blocks many times a step, so a DPO step spent most of
    its time in the kernel (bench/RESULTS.md, bench/gpu.py on a CPU). Keep freed memory in the
    heap instead, as `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>` would. glibc only; a no-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
