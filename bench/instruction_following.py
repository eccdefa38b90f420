"""Ground truth for the quickstart: IFEval's checkers' greedy pass rate (lm_eval, through
tasks/instructions.py) of a tuned policy and of its reference on the held-out prompts of a profile's data
that carry instructions, per instruction kind and overall, with 95 % paired-bootstrap intervals of the
difference. No judge is involved.

    .venv/bin/python bench/instruction_following.py                        # train DPO as the profile says, then compare
    .venv/bin/python bench/instruction_following.py --reference-only       # the base model's pass rate per kind
    .venv/bin/python bench/instruction_following.py --policy runs/x/merge/<hash>/model   # a merged folder or an adapter
    .venv/bin/python bench/instruction_following.py --set policy.max_steps=40 --prompts 0 --json out.json

Data, splits and training are the project's own (load -> filter -> split -> format, then
`tasks.policy.train_policy_adapter`), so the held-out prompts are those the flow evaluates on;
`--prompts 0` takes every held-out prompt, else a seeded sample as the evaluation draws it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from flows.config import load_config  # noqa: E402
from tasks.answers import generate  # noqa: E402
from tasks.data import apply_filter, format_split, load, read_jsonl, split  # noqa: E402
from tasks.evaluate import sample_prompts  # noqa: E402
from tasks.instructions import follows  # noqa: E402
from tasks.models import resolve_base_model  # noqa: E402
from tasks.stats import mean  # noqa: E402


def held_out_prompts(config, workdir: Path, prompts: int):
    """The profile's data through the project's own stages; the held-out prompts to generate on."""
    data, base = config.data, resolve_base_model(config.model)
    parts = split(apply_filter(load(data, workdir), data, workdir), data, workdir)
    formatted = format_split(
        parts, base.tokenizer(), workdir / "formatted", config.policy_settings().max_length, data.overlong
    )
    settings = config.evaluation.model_copy(update={"generation_prompts": prompts or 10**9})
    sample = sample_prompts(read_jsonl(formatted.eval.path), settings)
    return base, formatted, sample[sample.instruction_id_list.map(len) > 0].reset_index(drop=True)


def train(config, base, formatted, workdir: Path) -> tuple[str, float]:
    """A policy adapter trained by the flow's own policy stage code; its folder and the seconds it took."""
    from tasks.policy import train_policy_adapter
    from tasks.settings.tracking import TrackingSettings
    from tasks.tracking import configure

    configure(TrackingSettings(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}"))
    start = time.perf_counter()
    result = train_policy_adapter(config.method, config.policy_settings(), base, formatted, workdir / config.method)
    return result.adapter_dir, time.perf_counter() - start


def load_models(base_path: str, policy: str | None):
    """The reference (the base model) and, when given, the tuned policy: a merged folder or a LoRA adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    reference = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    if policy is None:
        return tokenizer, reference, None
    if (Path(policy) / "adapter_config.json").is_file():
        from peft import PeftModel

        tuned = (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), policy)
            .merge_and_unload()
            .eval()
        )
    else:
        tuned = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    return tokenizer, reference, tuned


def passes(model, tokenizer, sample, settings) -> tuple[np.ndarray, list[str]]:
    answers, _ = generate(model, tokenizer, list(sample.prompt), settings.max_new_tokens, settings.batch_size)
    return np.array(
        [
            follows(row.prompt[-1]["content"], list(row.instruction_id_list), list(row.kwargs), answer)
            for row, answer in zip(sample.itertuples(), answers)
        ]
    ), answers


def table(sample, reference: np.ndarray, tuned: np.ndarray | None, seed: int) -> tuple[str, dict]:
    """Per kind and overall: pass rates with intervals, and the paired difference tuned - reference."""
    kinds = np.array([",".join(ids) for ids in sample.instruction_id_list])
    lines = ["| kind | prompts | reference | tuned | tuned - reference |", "|---|---|---|---|---|"]
    figures = {}
    for kind in [*sorted(set(kinds)), "overall"]:
        rows = np.ones(len(kinds), bool) if kind == "overall" else kinds == kind
        ref = mean(reference[rows].astype(float), seed)
        entry = {"prompts": int(rows.sum()), "reference": ref.model_dump()}
        cells = [kind, str(int(rows.sum())), ref.text(2), "", ""]
        if tuned is not None:
            tun = mean(tuned[rows].astype(float), seed)
            difference = mean(tuned[rows].astype(float) - reference[rows].astype(float), seed)
            entry |= {"tuned": tun.model_dump(), "difference": difference.model_dump()}
            cells[3:] = [tun.text(2), difference.text(2)]
        figures[kind] = entry
        lines.append("| " + " | ".join(f"**{c}**" if kind == "overall" and c else c for c in cells) + " |")
    return "\n".join(lines), figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quickstart")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile setting, as `preftune run --set` does (repeatable)",
    )
    parser.add_argument("--policy", help="a merged policy folder or a LoRA adapter folder (default: train one now)")
    parser.add_argument("--reference-only", action="store_true", help="only the base model's pass rates")
    parser.add_argument(
        "--prompts",
        type=int,
        default=0,
        help="held-out prompts to generate on: 0 = all, N = the evaluation's seeded sample of N",
    )
    parser.add_argument("--workdir", help="keep the data and the trained adapter here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures and the answers as JSON here")
    args = parser.parse_args()
    config = load_config(args.profile, overrides=args.overrides)
    settings = config.evaluation

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        base, formatted, prompts = held_out_prompts(config, workdir, args.prompts)
        print(
            f"data {config.data.source}: {formatted.train.rows} train pairs, {formatted.eval.rows} held-out pairs, "
            f"{len(prompts)} held-out prompts; greedy, max_new_tokens {settings.max_new_tokens}",
            flush=True,
        )
        policy, seconds = args.policy, None
        if policy is None and not args.reference_only:
            policy, seconds = train(config, base, formatted, workdir)
            print(
                f"trained {config.method} for {config.policy_settings().max_steps} steps in {seconds:.0f} s: {policy}",
                flush=True,
            )
        tokenizer, reference, tuned = load_models(base.path, policy)
        start = time.perf_counter()
        reference_pass, reference_answers = passes(reference, tokenizer, prompts, settings)
        tuned_pass, tuned_answers = passes(tuned, tokenizer, prompts, settings) if tuned is not None else (None, None)
        print(f"generated in {time.perf_counter() - start:.0f} s\n", flush=True)
        text, figures = table(prompts, reference_pass, tuned_pass, settings.seed)
        print(text)
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "profile": args.profile,
                        "overrides": args.overrides,
                        "policy": policy,
                        "train_seconds": seconds,
                        "figures": figures,
                        "answers": [
                            {"prompt": p[-1]["content"], "reference": r, "tuned": t}
                            for p, r, t in zip(
                                prompts.prompt, reference_answers, tuned_answers or [None] * len(prompts)
                            )
                        ],
                    },
                    indent=2,
                )
                + "\n"
            )


if __name__ == "__main__":
    main()
