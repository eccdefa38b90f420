"""The GPU check: everything a lent card should show, in one call, with its results in one folder.

    bash bench/gpu_check.sh prepare --data DIR   # here, with PyPI: .gpu/ = package bundle, tokenizer, data samples
    bash bench/gpu_check.sh run                  # on the card (carry .gpu/): results in $GPU_CHECK_OUT
    bash bench/gpu_check.sh run --reduced        # on a CPU: tiny model, a step per stage (tests/test_bench.py)

`run` does, in this order: the environment (device, versions against requirements.lock, where merging
and evaluation are placed); `bench/gpu.py` (plain TRL with the book's settings against the `recipe`
and `auto` plans, alone on the device, since it times them); then at once the `gpu`-marked tests and
the flow runs: `smoke` and a cut `book` (TinyLlama-sized random Llama, local data, a few steps per
stage) in both plans, each through `preftune run` with Prefect's embedded server (or the one
--prefect-api names) and a fresh MLflow store in the results folder. From each run's MLflow records it
checks that every stage's plan is on the device (on a GPU run a CPU plan fails), that the merge check
and the evaluation ran there, and compares each training stage's planned peak memory with the
measured one. The figures go to one Markdown table (`gpu-check.md`, with `gpu-check.json`),
appended to bench/RESULTS.md with --record.
`--reduced` runs the same parts on a tiny model, where "on CUDA" becomes "the plan matches the device".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
ASSETS = REPO / ".gpu"
DATA_FILES = {"policy": "orca_dpo_pairs.sample.jsonl", "harmlessness": "hh_rlhf_harmless_base.sample.jsonl"}
TINYLLAMA = {
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
}  # as bench/gpu.py's `--size tinyllama`
MAX_ASSETS_MIB = 60  # what travels to the card with the checkout (each call takes 64 MiB of files)
MEMORY_TOLERANCE = 0.25  # the plan's estimate within 25 % of the measured peak
sys.path.insert(0, str(REPO))  # the project's modules (flows, tasks), imported where a part needs them


@dataclass
class Figure:
    figure: str
    value: str
    target: str
    met: bool | None = None  # None: reported, not judged (e.g. speed on a CPU)


# --- prepare: what the card needs, built here -------------------------------------------------------


def prepare(args) -> int:
    """The bundle of missing packages, the tokenizer of the random models and the two data samples, in .gpu/."""
    sys.path.insert(0, str(BENCH))
    import offline_bundle  # noqa: E402

    data = Path(args.data).expanduser() if args.data else None
    missing = [name for name in DATA_FILES.values() if not data or not (data / name).is_file()]
    if missing:
        print(
            f"gpu_check prepare: --data must name the folder holding {', '.join(DATA_FILES.values())} "
            f"(missing: {', '.join(missing)})",
            file=sys.stderr,
        )
        return 2
    assets, started = Path(args.assets), time.monotonic()
    bundle_args = [str(assets / "site.txz"), "--host-packages", args.host_packages, "--bnb-cuda", args.bnb_cuda]
    if args.dry_run:
        print(f"would copy into {assets}: the quickstart model's tokenizer files, {', '.join(DATA_FILES.values())}")
        return offline_bundle.main(bundle_args + ["--dry-run"])
    from tasks.models import resolve_model_path
    from tasks.settings.models import ModelSettings

    source = Path(resolve_model_path(ModelSettings()))
    tokenizer = assets / "tokenizer"
    shutil.rmtree(tokenizer, ignore_errors=True)
    tokenizer.mkdir(parents=True)
    for path in source.iterdir():  # config, tokenizer, chat template: everything but the weights
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copyfile(path, tokenizer / path.name)
    (assets / "data").mkdir(exist_ok=True)
    for name in DATA_FILES.values():
        shutil.copyfile(data / name, assets / "data" / name)
    if args.skip_bundle:
        print(f"{assets}: tokenizer and data copied; no bundle (--skip-bundle)")
        return 0
    if rc := offline_bundle.main(bundle_args):
        return rc
    size = sum(path.stat().st_size for path in assets.rglob("*") if path.is_file())
    record = {"seconds": round(time.monotonic() - started, 1), "bytes": size}
    (assets / "prepare.json").write_text(json.dumps(record) + "\n")
    print(f"{assets}: {size / 2**20:.1f} MiB in {record['seconds']} s")
    if size > MAX_ASSETS_MIB * 2**20:
        print(
            f"gpu_check prepare: {assets} is over {MAX_ASSETS_MIB} MiB: trim bench/gpu-host-packages.txt's "
            "complement or prune the bundle",
            file=sys.stderr,
        )
        return 1
    return 0


# --- run: the parts ---------------------------------------------------------------------------------


class Check:
    """One run of the check: where things go, what the device is, and the figures so far."""

    def __init__(self, args):
        import torch

        self.reduced, self.out = args.reduced, Path(args.out).resolve()
        self.prefect_api = args.prefect_api
        self.cuda = torch.cuda.is_available()
        self.device_kind = "cuda" if self.cuda else "cpu"
        self.device_name = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.work = Path(args.work or tempfile.mkdtemp(prefix="preftune-gpu-check-")).resolve()
        self.keep_work = bool(args.work)
        self.assets = Path(args.assets).resolve()
        data = Path(args.data).expanduser() if args.data else self.assets / "data"
        self.data = data.resolve() if all((data / name).is_file() for name in DATA_FILES.values()) else None
        self.tokenizer = self.assets / "tokenizer" if (self.assets / "tokenizer" / "config.json").is_file() else None
        if self.tokenizer:  # random models from the shipped tokenizer: this run's own cache (this process's too)
            os.environ["PREFTUNE_CACHE_DIR"] = str(self.work / "cache")
        self.figures: list[Figure] = []
        self.parts: dict[str, float] = {}
        self.started = time.monotonic()
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / "gpu-check.json").is_file():
            raise SystemExit(
                f"gpu_check run: {self.out} holds files that are not an earlier check's: choose another --out"
            )
        shutil.rmtree(self.out, ignore_errors=True)  # an earlier check's results
        (self.out / "logs").mkdir(parents=True)
        (self.out / "gpu-check.json").write_text("{}\n")

    def expected(self) -> str:
        """What every plan's device must be: CUDA on the card; on a CPU run (reduced) the device itself."""
        return self.device_kind if self.reduced else "cuda"

    def env(self, part: str, threads: int | None = None, store: bool = False) -> dict[str, str]:
        """Subprocess environment: offline, caches and stores of this run only, one MLflow store per part."""
        env = dict(
            os.environ,
            HF_HOME=str(self.work / "hf"),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            PREFECT_HOME=str(self.work / "prefect" / part),
            PYTHONUNBUFFERED="1",
        )
        (self.work / "prefect" / part).mkdir(parents=True, exist_ok=True)  # Prefect makes only the last folder
        for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):  # Prefect's embedded default; the part's own store
            env.pop(name, None)
        if self.prefect_api:  # a running server instead (the tests': saves a temporary server's start per flow run)
            env["PREFECT_API_URL"] = self.prefect_api
        if store:
            (self.out / "mlflow" / part).mkdir(parents=True, exist_ok=True)
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{self.out / 'mlflow' / part / 'mlflow.db'}"
        if self.tokenizer:  # the tiny test model's tokenizer where the packaged GGUF is absent (tests/conftest.py)
            env["PREFTUNE_TEST_BASE_MODEL"] = str(self.tokenizer)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        return env

    def command(self, part: str, argv: list[str], timeout: float, threads: int | None = None, store: bool = False):
        """Run one part's command, its output in logs/<part>.log; (returncode or None on timeout, seconds, output)."""
        log, started = self.out / "logs" / f"{part}.log", time.monotonic()
        with open(log, "w") as handle:
            handle.write("$ " + " ".join(argv) + "\n")
            handle.flush()
            try:
                rc = subprocess.run(
                    argv,
                    cwd=REPO,
                    env=self.env(part, threads, store),
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = None
        seconds = time.monotonic() - started
        self.parts[part] = round(seconds, 1)
        return rc, seconds, log.read_text(errors="replace")

    def add(self, *figures: Figure) -> None:
        self.figures.extend(figures)

    # What the table and the record say.
    def table(self) -> str:
        mark = {True: "yes", False: "**no**", None: "n/a"}
        lines = ["| figure | value | target | met |", "|---|---|---|---|"]
        lines += [f"| {f.figure} | {f.value} | {f.target} | {mark[f.met]} |" for f in self.figures]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        heading = (
            f"### {datetime.date.today()} · GPU check{' (reduced)' if self.reduced else ''} · "
            f"{self.device_name} · `bash bench/gpu_check.sh run{' --reduced' if self.reduced else ''}`"
        )
        failed = [f.figure for f in self.figures if f.met is False]
        summary = (
            f"{len(self.figures)} figures, {len(failed)} not met; {time.monotonic() - self.started:.0f} s "
            f"in all (parts: {', '.join(f'{k} {v:.0f} s' for k, v in self.parts.items())})"
        )
        (self.out / "gpu-check.md").write_text(f"{heading}\n\n{summary}\n\n{self.table()}")
        (self.out / "gpu-check.json").write_text(
            json.dumps(
                {
                    "device": self.device_name,
                    "reduced": self.reduced,
                    "seconds": self.parts,
                    "figures": [asdict(f) for f in self.figures],
                },
                indent=2,
            )
            + "\n"
        )


def part_environment(check: Check) -> None:
    """The device, versions against requirements.lock, and where merging and evaluation will run."""
    from importlib import metadata

    import torch

    from tasks.plan import inference_placement

    check.add(
        Figure(
            "device",
            f"{check.device_name} (torch {torch.__version__}, CUDA {torch.version.cuda})",
            "a CUDA device" if not check.reduced else "this machine's device",
            check.cuda or check.reduced,
        )
    )
    placement, dtype = inference_placement()
    check.add(
        Figure(
            "placement of merging, scoring and generation",
            f"{placement}, {str(dtype).removeprefix('torch.')}",
            check.expected(),
            placement == check.expected(),
        )
    )
    differing, absent = [], []
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", line):
            name, locked = match.groups()
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                absent.append(name)  # dev-only ones (kubernetes-validate...) are not bundled
                continue
            if installed.split("+")[0] != locked.split("+")[0]:
                differing.append(f"{name} {installed} (locked {locked})")
    check.add(Figure("packages differing from requirements.lock", "; ".join(differing) or "none", "reported", None))
    needed = [name for name in absent if name.lower() in runtime_requirements()]
    check.add(Figure("run-time requirements absent", ", ".join(needed) or "none", "none", not needed))
    bundle, site = check.assets / "site.json", os.environ.get("PREFTUNE_GPU_SITE")
    if bundle.is_file() and site:
        manifest = json.loads(bundle.read_text())
        check.add(
            Figure(
                "offline bundle",
                f"{len(manifest['packages'])} packages, {manifest['bytes'] / 2**20:.1f} MiB, "
                f"bitsandbytes {manifest['bnb_cuda']}",
                "under 60 MiB with the data",
                manifest["bytes"] < MAX_ASSETS_MIB * 2**20,
            )
        )
    if site and check.cuda:  # the bundle keeps one CUDA family's bitsandbytes libraries (prepare --bnb-cuda)
        wanted = f"libbitsandbytes_cuda{torch.version.cuda.replace('.', '')}.so"
        kept = sorted(path.name for path in Path(site).glob("bitsandbytes/libbitsandbytes_*.so"))
        check.add(
            Figure("bitsandbytes library for this torch's CUDA", ", ".join(kept) or "none", wanted, wanted in kept)
        )


def runtime_requirements() -> set[str]:
    """pyproject.toml's run-time dependencies, by name."""
    import tomllib

    specs = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower() for spec in specs}


def warm_models(check: Check, book: bool) -> None:
    """Build the random models the concurrent parts share (the tests' and smoke's tiny Llama, the book's
    TinyLlama-sized one) once, here: two processes building the same cache entry would collide."""
    from tasks.models import resolve_model_path
    from tasks.settings.models import DEFAULT_BASE_MODEL, ModelSettings, RandomInitSettings

    base = str(check.tokenizer) if check.tokenizer else DEFAULT_BASE_MODEL
    started = time.monotonic()
    for random_init in [RandomInitSettings()] + (
        [RandomInitSettings(**TINYLLAMA)] if book and not check.reduced else []
    ):
        resolve_model_path(ModelSettings(base_model=base, random_init=random_init))
    check.parts["random models"] = round(time.monotonic() - started, 1)


def build_referee(check: Check) -> Path:
    """A randomly initialised sequence-classification Llama with the shipped tokenizer, standing in for the
    book's Hub referees (evaluation.referees): the card has no network, and the path is what is checked."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from tasks.models import random_llama_config, resolve_model_path
    from tasks.settings.models import DEFAULT_BASE_MODEL, ModelSettings, RandomInitSettings

    folder = check.work / "referee"
    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_model_path(
                ModelSettings(base_model=str(check.tokenizer) if check.tokenizer else DEFAULT_BASE_MODEL)
            )
        )
        config = random_llama_config(tokenizer, RandomInitSettings())
        config.num_labels = 1
        LlamaForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def hub_references(values, path: str = "") -> list[str]:
    """Settings that still name a Hub model or dataset (the card is offline)."""
    found = []
    for key, value in values.items() if isinstance(values, dict) else []:
        name = f"{path}{key}"
        if isinstance(value, dict):
            found += hub_references(value, f"{name}.")
        elif (
            key in {"source", "base_model", "model", "judge", "chat_template_from"}
            and isinstance(value, str)
            and value.count("/") == 1
            and not value.startswith((".", "/", "~", "package:", "models:/"))
            and not Path(value).exists()
        ):
            found.append(f"{name}={value}")
    return found


def part_gpu_tests(check: Check, timeout: float) -> list[Figure]:
    """`pytest -m gpu` on the test files that have such tests."""
    files = sorted(
        str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py") if "mark.gpu" in path.read_text()
    )
    rc, seconds, output = check.command(
        "pytest-gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files], timeout
    )
    counts = dict(
        (kind, int(n))
        for n, kind in re.findall(
            r"(\d+) (passed|failed|skipped|error|errors|deselected)", output.splitlines()[-1] if output.strip() else ""
        )
    )
    passed, skipped = counts.get("passed", 0), counts.get("skipped", 0)
    value = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or f"exit {rc}"
    if check.reduced and not check.cuda:
        met, target = rc == 0 and passed == 0 and skipped > 0, "collected, each skipped without CUDA"
    else:
        met, target = rc == 0 and passed > 0 and skipped == 0, "every one passes on CUDA"
    return [
        Figure(
            f"`pytest -m gpu` ({', '.join(files)})",
            f"{value} in {seconds:.0f} s" + (" (timed out)" if rc is None else ""),
            target,
            met,
        )
    ]


def part_benchmark(check: Check, timeout: float) -> None:
    """bench/gpu.py: plain TRL (book settings) against the recipe and auto plans, same effective batch."""
    size, steps, warmup = ("tiny", 1, 0) if check.reduced else ("tinyllama", 10, 2)  # reduced: times nothing it judges
    # On a CPU the orca pairs' 512 tokens make a QLoRA step take a minute: generated (short) pairs there.
    data = str(check.data / DATA_FILES["policy"]) if check.data and not check.reduced else "synthetic"
    argv = [
        sys.executable,
        str(BENCH / "gpu.py"),
        "--size",
        size,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--data",
        data,
        "--json",
        str(check.out / "gpu-bench.json"),
        "--record",
        str(check.out / "gpu-bench.md"),
    ]
    if check.tokenizer:
        argv += ["--tokenizer", str(check.tokenizer)]
    rc, seconds, _ = check.command("gpu-bench", argv, timeout)
    check.add(
        Figure(
            f"bench/gpu.py --size {size}: {steps} timed steps per variant, 8 pairs each",
            f"{'completed' if rc == 0 else f'exit {rc}'} in {seconds:.0f} s",
            "completes",
            rc == 0,
        )
    )
    if rc != 0:
        return
    result = json.loads((check.out / "gpu-bench.json").read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    judged = check.cuda and not check.reduced
    for name, row in rows.items():
        mfu = f", MFU {row['MFU %']:.1f} %" if row["MFU %"] is not None else ""
        check.add(
            Figure(
                f"{name}: [{row['plan']}]",
                f"{row['s/step']:.3f} s/step, {row['tokens/s']:.0f} tokens/s{mfu}, peak {row['peak GiB']:.2f} GiB",
                "measured",
                None,
            )
        )
    plain, recipe, auto = rows.get("plain-trl"), rows.get("recipe"), rows.get("auto")
    if plain and auto:
        speedup = plain["s/step"] / auto["s/step"]
        check.add(
            Figure(
                "auto vs plain TRL per optimizer step", f"{speedup:.2f}x", ">= 10x", speedup >= 10 if judged else None
            )
        )
        mfu = auto["MFU %"]
        check.add(
            Figure(
                "auto MFU",
                f"{mfu:.1f} %" if mfu is not None else "n/a (TRL knows no peak FLOPs for this device)",
                ">= 30 %",
                mfu >= 30 if judged and mfu is not None else None,
            )
        )
    if plain and recipe:
        ratio = recipe["s/step"] / plain["s/step"]
        check.add(
            Figure("recipe time per step vs plain TRL", f"{ratio:.2f}x", "<= 1.05x", ratio <= 1.05 if judged else None)
        )
    for name in ("recipe", "auto"):
        if (row := rows.get(name)) and row.get("estimated GiB"):
            check.add(
                memory_figure(
                    f"bench {name}: plan's estimate vs measured peak", row["estimated GiB"], row["peak GiB"], judged
                )
            )


def memory_figure(label: str, estimated: float, measured: float | None, judged: bool) -> Figure:
    if measured is None:
        return Figure(
            label, f"estimated {estimated:.2f} GiB, no measured peak (CPU: not recorded)", "within 25 %", None
        )
    error = (estimated - measured) / measured
    return Figure(
        label,
        f"estimated {estimated:.2f} GiB, measured {measured:.2f} GiB ({100 * error:+.0f} %)",
        "within 25 %",
        abs(error) <= MEMORY_TOLERANCE if judged else None,
    )


@dataclass
class FlowRun:
    profile: str
    plan: str
    overrides: list[str]

    @property
    def name(self) -> str:
        return f"{self.profile}-{self.plan}"


def flow_runs(check: Check, selected: list[str]) -> list[FlowRun]:
    """smoke and the cut book profile, in both plans, on local files only."""
    model = [f"model.base_model={check.tokenizer}"] if check.tokenizer else []
    steps = 1 if check.reduced else None
    smoke = model + (
        [
            "policy.max_steps=1",
            "sft.max_steps=1",
            "rewards.helpfulness.max_steps=1",
            "rewards.harmlessness.max_steps=1",
            "evaluation.generation_prompts=2",
            "evaluation.max_new_tokens=4",
        ]
        if check.reduced
        else []
    )
    runs = [FlowRun("smoke", plan, smoke) for plan in ("auto", "recipe")]
    if check.data:
        cut = steps or 3
        random_init = "{}" if check.reduced else json.dumps(TINYLLAMA)
        book = model + [
            f"model.random_init={random_init}",
            "model.tokenizer.chat_template_from=null",
            "model.tokenizer.pad_token=null",
            f"data.source={check.data / DATA_FILES['policy']}",
            "data.format=auto",
            f"rewards.harmlessness.data.source={check.data / DATA_FILES['harmlessness']}",
            "rewards.harmlessness.data.data_dir=null",
            "rewards.harmlessness.data.format=hh_rlhf",
            "sft.chat_data=null",  # SFT on the preference pairs' chosen answers instead of ultrachat
            f"rewards.helpfulness.max_steps={cut}",
            f"rewards.harmlessness.max_steps={cut}",
            f"sft.max_steps={steps or 5}",
            f"policy.max_steps={steps or 5}",
            "rewards.helpfulness.logging_steps=1",
            "rewards.harmlessness.logging_steps=1",
            "sft.logging_steps=1",
            "policy.logging_steps=1",
            f"evaluation.generation_prompts={2 if check.reduced else 8}",
            f"evaluation.max_new_tokens={4 if check.reduced else 64}",
        ]
        from flows.config import load_config

        referees = load_config("book").evaluation.referees
        if referees:  # Hub reward models: a local random one in their place
            referee = build_referee(check)
            book += [f"evaluation.referees.{name}.model={referee}" for name in referees]
        if check.reduced:  # a CPU: shorter sequences and a share of hh-rlhf, the same keys
            book += [
                f"{stage}.max_length=128" for stage in ("rewards.helpfulness", "rewards.harmlessness", "sft", "policy")
            ]
            book += ["rewards.harmlessness.data.max_rows=300"]
        runs += [FlowRun("book", plan, book) for plan in ("auto", "recipe")]
    return [run for run in runs if run.name in selected]


def part_flow(check: Check, run: FlowRun, timeout: float, threads: int | None) -> list[Figure]:
    """One `preftune run`, then its MLflow records checked: plans on the device, merge and evaluation, memory."""
    from flows.config import load_config

    if hub := hub_references(load_config(run.profile, overrides=run.overrides).model_dump()):
        return [Figure(f"{run.name}: settings naming the Hub (offline here)", ", ".join(hub), "none", False)]
    argv = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--profile",
        run.profile,
        "--set",
        f"plan.mode={run.plan}",
        "--set",
        f"run_name={run.name}",
        "--set",
        f"runs_dir={check.work / 'runs'}",
        *[item for override in run.overrides for item in ("--set", override)],
    ]
    rc, seconds, output = check.command(run.name, argv, timeout, threads, store=True)
    found = re.search(r"^MLflow run id : (\w+)", output, re.M)
    figures = [
        Figure(
            f"{run.name}: `preftune run --profile {run.profile}` (plan {run.plan})",
            f"{'completed' if rc == 0 and found else f'exit {rc}'} in {seconds:.0f} s",
            "completes",
            rc == 0 and bool(found),
        )
    ]
    if rc != 0 or not found:
        tail = " / ".join(line.strip() for line in output.strip().splitlines()[-3:])[-300:].replace("|", "\\|")
        figures.append(Figure(f"{run.name}: last lines (logs/{run.name}.log)", tail, "-", None))
        return figures
    figures += inspect_run(check, run, found.group(1))
    shutil.rmtree(check.work / "runs" / run.name, ignore_errors=True)  # merged fp32 models: GBs per book run
    return figures


def inspect_run(check: Check, run: FlowRun, run_id: str) -> list[Figure]:
    """What the run's MLflow store says about where each stage ran and how much memory it took."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{check.out / 'mlflow' / run.name / 'mlflow.db'}")
    parent = client.get_run(run_id)
    params, tags, metrics = parent.data.params, parent.data.tags, parent.data.metrics
    kinds = {
        key.split(".")[1]: value
        for key, value in params.items()
        if key.startswith("plan.") and key.endswith(".device_kind")
    }
    wanted = check.expected()
    figures = [
        Figure(
            f"{run.name}: training plans' device",
            ", ".join(f"{stage} {kind}" for stage, kind in kinds.items())
            + f" ({tags.get('preftune.device')}; {tags.get('preftune.adapter')}, {tags.get('preftune.precision')})",
            f"every stage on {wanted}",
            bool(kinds) and set(kinds.values()) == {wanted},
        )
    ]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    by_stage = {child.data.tags.get("preftune.stage", child.info.run_name): child for child in children}
    difference = metrics.get("merge.max_logit_difference")
    merge_device = tags.get("merge.device")
    figures.append(
        Figure(
            f"{run.name}: merge check (max logit difference, merged vs base+adapters)",
            f"{difference:.2e} on {merge_device}" if difference is not None else "not run",
            f"<= {1e-3:.0e} on {wanted}",
            difference is not None and difference <= 1e-3 and merge_device == wanted,
        )
    )
    evaluation = by_stage.get("evaluate")
    eval_device = evaluation and evaluation.data.params.get("evaluate.device")
    figures.append(
        Figure(
            f"{run.name}: evaluation",
            f"{evaluation.info.status}, {len(evaluation.data.metrics)} metrics on {eval_device}"
            if evaluation
            else "not run",
            f"finished on {wanted}",
            bool(evaluation)
            and evaluation.info.status == "FINISHED"
            and bool(evaluation.data.metrics)
            and eval_device == wanted,
        )
    )
    judged = check.cuda and not check.reduced
    for stage in kinds:
        child = by_stage.get(stage)
        key = (
            f"plan.{stage}.estimated_peak_gib"  # the stage's own run has the plan it trained with (after an OOM retry)
        )
        estimated = float(child.data.params.get(key, params[key]) if child else params[key])
        measured = child.data.metrics.get("peak_memory_gib") if child else None
        if child is None:
            figures.append(
                Figure(
                    f"{run.name} {stage}: plan's estimate vs measured peak",
                    "the stage has no run",
                    "within 25 %",
                    False,
                )
            )
        elif measured is None and check.cuda:
            figures.append(
                Figure(
                    f"{run.name} {stage}: plan's estimate vs measured peak",
                    f"estimated {estimated:.2f} GiB; the stage logged no peak_memory_gib",
                    "within 25 %",
                    False,
                )
            )
        else:
            figures.append(
                memory_figure(f"{run.name} {stage}: plan's estimate vs measured peak", estimated, measured, judged)
            )
    return figures


PARTS = ["environment", "gpu-bench", "pytest-gpu", "smoke-auto", "smoke-recipe", "book-auto", "book-recipe"]
# A CPU's reduced form: every kind of part once. One flow run (book in `recipe`): the auto plan's flow is
# the one the rest of the suite runs, and the flow part is the same code for every profile and plan.
REDUCED_PARTS = ["environment", "gpu-bench", "pytest-gpu", "book-recipe"]


def run(args) -> int:
    check = Check(args)
    if not check.cuda and not check.reduced:
        print(
            "gpu_check run: no CUDA device here; the full check is for a GPU (on a CPU: run --reduced)", file=sys.stderr
        )
        return 2
    if not check.reduced and not (check.tokenizer and check.data):
        print(
            f"gpu_check run: {check.assets} lacks the tokenizer or the data samples: run "
            "`bash bench/gpu_check.sh prepare --data DIR` where there is PyPI, and carry .gpu/",
            file=sys.stderr,
        )
        return 2
    selected = args.parts.split(",") if args.parts else (REDUCED_PARTS if check.reduced else PARTS)
    deadline = time.monotonic() + args.budget

    def left(share: float = 1.0) -> float:
        return max(30.0, (deadline - time.monotonic()) * share)

    def guarded(name: str, part, *arguments) -> list[Figure]:
        """A part that breaks is a failed figure, and the other parts still run (one call on a card)."""
        try:
            return part(*arguments) or []
        except Exception as error:  # reported in the table, with the part's name
            return [
                Figure(
                    f"{name}: the check itself failed",
                    f"{type(error).__name__}: {error}"[:300].replace("|", "/"),
                    "runs",
                    False,
                )
            ]

    try:
        if "environment" in selected:
            check.add(*guarded("environment", part_environment, check))
            check.write()
        if "gpu-bench" in selected:  # alone on the device: it times
            check.add(*guarded("gpu-bench", part_benchmark, check, left(0.45)))
            check.write()
        try:
            flows = flow_runs(check, selected)
        except Exception as error:  # e.g. a profile that no longer validates with the overrides
            flows = []
            check.add(
                Figure("flow runs: the check itself failed", f"{type(error).__name__}: {error}"[:300], "runs", False)
            )
        check.add(*guarded("random models", warm_models, check, any(flow.profile == "book" for flow in flows)))
        jobs = max(1, min(args.jobs or (len(flows) + 1 if check.cuda else 1), len(flows) + 1))
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        with ThreadPoolExecutor(jobs) as pool:  # the tests and the flow runs: memory, not time, is measured there
            futures = (
                [pool.submit(guarded, "pytest-gpu", part_gpu_tests, check, left())] if "pytest-gpu" in selected else []
            )
            futures += [pool.submit(guarded, flow.name, part_flow, check, flow, left(), threads) for flow in flows]
            for future in futures:
                check.add(*future.result())
                check.write()
    finally:
        check.write()
        if not check.keep_work:
            shutil.rmtree(check.work, ignore_errors=True)
    print((check.out / "gpu-check.md").read_text())
    if args.record:
        record(check.out)
    return 1 if any(f.met is False for f in check.figures) else 0


def record(out: Path) -> None:
    """Append a results folder's table to bench/RESULTS.md (also for a folder brought back from a card)."""
    with open(REPO / "bench" / "RESULTS.md", "a") as handle:
        handle.write("\n" + (out / "gpu-check.md").read_text())
    print(f"appended {out / 'gpu-check.md'} to bench/RESULTS.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="build .gpu/ here (needs PyPI): bundle, tokenizer, data samples")
    prep.add_argument(
        "--data",
        default=os.environ.get("GPU_CHECK_DATA"),
        help=f"folder holding {' and '.join(DATA_FILES.values())} (or $GPU_CHECK_DATA)",
    )
    prep.add_argument("--assets", default=str(ASSETS), help="where to put them (default .gpu/, git-ignored)")
    prep.add_argument(
        "--host-packages",
        default=str(BENCH / "gpu-host-packages.txt"),
        help="what the GPU host has already (left out of the bundle)",
    )
    prep.add_argument("--bnb-cuda", default="cuda13", help="bitsandbytes libraries to keep (the host torch's CUDA)")
    prep.add_argument("--dry-run", action="store_true", help="list what would be bundled; download nothing")
    prep.add_argument(
        "--skip-bundle", action="store_true", help="copy the tokenizer and data only (a CPU run needs no bundle)"
    )
    go = commands.add_parser("run", help="run every part and write the results folder")
    go.add_argument("--reduced", action="store_true", help="tiny model, a step per stage: the CPU form (CI)")
    go.add_argument(
        "--out",
        default=os.environ.get("GPU_CHECK_OUT", str(BENCH / "gpu-check")),
        help="results folder (or $GPU_CHECK_OUT; default bench/gpu-check/, git-ignored)",
    )
    go.add_argument(
        "--work",
        default=os.environ.get("GPU_CHECK_WORK"),
        help="models, runs and caches (GBs on a card; default: a temporary folder, removed after)",
    )
    go.add_argument("--assets", default=str(ASSETS), help="what prepare built (tokenizer/, data/)")
    go.add_argument("--data", help="the data samples' folder, instead of the assets' copy")
    go.add_argument(
        "--prefect-api",
        help="a running Prefect server's API URL for the flow runs (default: each starts Prefect's temporary server)",
    )
    go.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)}")
    go.add_argument("--jobs", type=int, help="tests and flow runs at once (default: all on a GPU, 1 on a CPU)")
    go.add_argument(
        "--budget",
        type=float,
        default=float(os.environ.get("GPU_CHECK_BUDGET_S", 540)),
        help="seconds for the whole check; each part gets what is left (default 540)",
    )
    go.add_argument(
        "--record",
        action="store_true",
        default=os.environ.get("GPU_CHECK_RECORD") == "1",
        help="append the table to bench/RESULTS.md (or GPU_CHECK_RECORD=1)",
    )
    keep = commands.add_parser("record", help="append a results folder's table to bench/RESULTS.md")
    keep.add_argument("out", nargs="?", default=os.environ.get("GPU_CHECK_OUT", str(BENCH / "gpu-check")))
    args = parser.parse_args(argv)
    if args.command == "record":
        record(Path(args.out))
        return 0
    return prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
