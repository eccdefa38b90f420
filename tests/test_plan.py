"""Training plans: the precision decision and the memory fit, for described cards (no GPU needed),
checked against what autograd really keeps; GPU-marked tests run them on a real card."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from flows.cli import main
from flows.config import load_config
from tasks.base import PreftuneError
from tasks.plan import DeviceSpec, ModelShape, TrainingPlan, choose_precision, plan_stage
from tasks.settings.models import LoraSettings, ModelSettings
from tasks.settings.plan import PlanSettings
from tasks.trainer import config_arguments

TINYLLAMA = LlamaConfig(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
)
LLAMA_7B = LlamaConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
)
CPU = DeviceSpec(kind="cpu", name="cpu", memory_gib=20, bf16=False)
H100 = DeviceSpec.described_gpu(79, bf16=True, name="H100")
T4 = DeviceSpec.described_gpu(15, bf16=False, name="T4")
AUTO, RECIPE = PlanSettings(), PlanSettings(mode="recipe")


@pytest.fixture(scope="module")
def book():
    return load_config("book")


@pytest.fixture(scope="module")
def tinyllama() -> ModelShape:
    return ModelShape.from_config(TINYLLAMA)


def book_plans(book, shape, device, settings=AUTO) -> list[TrainingPlan]:
    stages = [(f"reward-{name}", "reward", reward) for name, reward in book.rewards.items()]
    stages += [("sft", "sft", book.sft), ("dpo", "dpo", book.policy)]
    return [
        plan_stage(stage, kind, stage_settings, book.model, shape, device, settings)
        for stage, kind, stage_settings in stages
    ]


@pytest.mark.parametrize(
    "requested, device, expected",
    [
        ("auto", CPU, "fp32"),
        ("fp16", CPU, "fp32"),
        ("bf16", CPU, "fp32"),
        ("auto", H100, "bf16"),
        ("fp16", H100, "bf16"),
        ("bf16", H100, "bf16"),
        ("fp32", H100, "fp32"),
        ("auto", T4, "fp16"),
        ("fp16", T4, "fp16"),
        ("bf16", T4, "fp16"),
    ],
)
def test_precision_is_decided_by_the_card(requested, device, expected):
    choice = choose_precision(requested, device)
    assert choice.precision == expected
    assert choice.weights_dtype == {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[expected]


def test_model_shape_counts_parameters_and_lora_without_weights(tinyllama):
    assert 1.09e9 < tinyllama.parameters < 1.11e9  # TinyLlama-1.1B: 1,100,048,384 parameters
    lora = LoraSettings(
        r=64,
        alpha=32,
        dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    # r x (in + out) per projection, 22 layers: the figure PEFT prints for the book's adapter.
    per_layer = 64 * ((2048 + 2048) * 2 + (2048 + 256) * 2 + (2048 + 5632) * 3)
    assert tinyllama.lora_parameters(lora) == 22 * per_layer == 50_462_720


def test_model_shape_matches_a_real_model():
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    shape = ModelShape.from_config(config)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    lora = LoraSettings(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, lora.peft_config("CAUSAL_LM"))
    assert shape.lora_parameters(lora) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def saved_activation_bytes(config: LlamaConfig, lora: LoraSettings, batch: int, length: int) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (parameters excluded)."""
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), lora.peft_config("CAUSAL_LM")).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=torch.randint(0, config.vocab_size, (batch, length)))
    return sum(saved.values())


@pytest.mark.parametrize(
    "targets, dropout",
    [
        (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 0.1),
        (["q_proj", "k_proj", "v_proj", "o_proj"], 0.05),
        (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 0.0),
    ],
)
def test_activation_estimate_is_what_autograd_keeps(targets, dropout):
    """The estimate's per-layer activation term against the bytes a real LoRA Llama saves (fp32, CPU):
    within 25 %, and never far below (an underestimate means an out-of-memory error)."""
    lora = LoraSettings(r=8, dropout=dropout, target_modules=targets)
    one, two = ({"num_hidden_layers": layers} for layers in (1, 2))
    base = dict(vocab_size=512, hidden_size=512, intermediate_size=1376, num_attention_heads=16, num_key_value_heads=4)
    batch, length = 2, 64
    measured = saved_activation_bytes(LlamaConfig(**base, **two), lora, batch, length) - saved_activation_bytes(
        LlamaConfig(**base, **one), lora, batch, length
    )
    shape = ModelShape.from_config(LlamaConfig(**base, **one))
    estimated = batch * length * shape.activation_elements(lora) * 4
    assert 0.9 * measured <= estimated <= 1.25 * measured, (estimated, measured)


def test_recipe_plan_is_the_profile_verbatim_but_for_precision(book, tinyllama):
    for plan in book_plans(book, tinyllama, H100, RECIPE):
        assert (plan.micro_batch, plan.gradient_accumulation, plan.gradient_checkpointing) == (2, 4, True)
        assert (plan.optim, plan.quantization, plan.compute_dtype, plan.double_quant) == (
            "paged_adamw_32bit",
            "nf4",
            "float16",
            True,
        )
        assert plan.precision == "bf16" and any("fp16 requested" in reason for reason in plan.reasons)
        assert plan.memory.total_gib < 4  # QLoRA at micro-batch 2: the T4-era footprint
    t4 = book_plans(book, tinyllama, T4, RECIPE)
    assert {(p.precision, p.trainable_dtype) for p in t4} == {("fp16", "float32")}  # the gradient scaler can unscale
    cpu = book_plans(book, tinyllama, CPU, RECIPE)
    assert {(p.precision, p.quantization) for p in cpu} == {("fp32", "none")}


def test_auto_plan_uses_an_80gb_card_and_keeps_the_recipe(book, tinyllama):
    for plan in book_plans(book, tinyllama, H100):
        assert plan.quantization == "none" and plan.precision == "bf16" and plan.weights_dtype == "bfloat16"
        assert (plan.micro_batch, plan.gradient_accumulation, plan.gradient_checkpointing) == (8, 1, False)
        assert plan.optim == "adamw_torch_fused" and plan.memory.total_gib <= plan.memory_budget_gib
    dpo = book_plans(book, tinyllama, H100)[-1]
    recipe = book_plans(book, tinyllama, H100, RECIPE)[-1]
    arguments = config_arguments(book.policy, "trl.DPOConfig", "dpo")
    tuned, verbatim = (arguments | plan.trainer_overrides() for plan in (dpo, recipe))
    changed = {key for key in tuned if tuned[key] != verbatim[key]}
    assert changed == {
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "activation_checkpointing",
        "optim",
    }
    assert tuned["per_device_train_batch_size"] * tuned["gradient_accumulation_steps"] == 8  # the effective batch
    # The estimate for this plan is within reach of the 20.7 GiB measured on an H100 (LIBRARIES.md).
    assert 18 < dpo.memory.total_gib < 30


def test_auto_plan_fits_a_16gb_fp16_card_and_never_picks_bf16(book, tinyllama):
    for plan in book_plans(book, tinyllama, T4):
        assert plan.precision == "fp16" and plan.trainable_dtype == "float32"
        assert "bfloat16" not in (plan.weights_dtype, plan.compute_dtype)
        assert plan.memory.total_gib <= plan.memory_budget_gib <= 15
        assert plan.micro_batch * plan.gradient_accumulation == 8


def test_4bit_only_where_16bit_weights_do_not_fit(book):
    seven_b = ModelShape.from_config(LLAMA_7B)
    roomy = plan_stage("dpo", "dpo", book.policy, book.model, seven_b, DeviceSpec.described_gpu(40, True), AUTO)
    tight = plan_stage("dpo", "dpo", book.policy, book.model, seven_b, DeviceSpec.described_gpu(16, True), AUTO)
    assert roomy.quantization == "none" and roomy.memory.weights_gib > 12
    assert tight.quantization == "nf4" and tight.compute_dtype == "bfloat16" and tight.memory.weights_gib < 5
    forced = book.model.model_copy(update={"quantization": book.model.quantization.model_copy(update={"mode": "none"})})
    with pytest.raises(PreftuneError, match="dpo: does not fit on .* lower max_length"):
        plan_stage("dpo", "dpo", book.policy, forced, seven_b, DeviceSpec.described_gpu(16, True), AUTO)


def test_out_of_memory_shrinks_the_micro_batch_then_checkpoints_then_stops(book, tinyllama):
    plan = book_plans(book, tinyllama, H100)[-1]
    shapes = []
    while True:
        try:
            plan = plan.shrunk()
        except PreftuneError as error:
            assert "micro-batch 1 with gradient checkpointing" in str(error)
            break
        shapes.append((plan.micro_batch, plan.gradient_accumulation, plan.gradient_checkpointing))
    assert shapes == [(4, 2, False), (2, 4, False), (1, 8, False), (1, 8, True)]


def test_cpu_plan_trains_fp32_without_checkpointing(book, tinyllama):
    for plan in book_plans(book, tinyllama, CPU):
        assert (plan.precision, plan.quantization, plan.gradient_checkpointing, plan.optim) == (
            "fp32",
            "none",
            False,
            "adamw_torch",
        )
        assert plan.micro_batch == 2  # the profile's: a CPU gains nothing per pair from larger micro-batches


def test_precomputed_reference_only_when_training_sees_the_data_again(book, tinyllama):
    one_pass = plan_stage("dpo", "dpo", book.policy, book.model, tinyllama, H100, AUTO, train_pairs=5922)
    epochs = plan_stage("dpo", "dpo", book.policy, book.model, tinyllama, H100, AUTO, train_pairs=400)
    assert not one_pass.precompute_ref_log_probs and epochs.precompute_ref_log_probs is True
    assert "precompute_ref_log_probs" not in book_plans(book, tinyllama, H100)[0].trainer_overrides()  # the reward's


def test_cli_plans_a_described_card(capsys):
    assert main(["plan", "--profile", "smoke", "--gpu-memory-gib", "16", "--no-bf16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["device"]["bf16"] is False and printed["device"]["memory_gib"] == 16
    assert set(printed["stages"]) == {"reward-helpfulness", "reward-harmlessness", "sft", "dpo"}
    assert {stage["precision"] for stage in printed["stages"].values()} == {"fp16"}
    assert main(["plan", "--profile", "smoke", "--no-bf16"]) == 2  # a card needs its memory
    assert "--gpu-memory-gib" in capsys.readouterr().err


def test_cli_plans_this_machine(capsys):
    assert main(["plan", "--profile", "smoke", "--set", "plan.mode=recipe"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {stage["device_kind"] for stage in stages.values()} == {expected}
    assert {stage["mode"] for stage in stages.values()} == {"recipe"}


def test_precision_request_on_a_cpu_is_explained():
    reason = choose_precision("fp16", CPU).reason
    assert "fp16 requested" in reason and ModelSettings().precision == "auto"
