"""PNG figures for the evaluation: reward margins on held-out pairs, and training curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or workers

import matplotlib.pyplot as plt  # noqa: E402
from mlflow import MlflowClient  # noqa: E402


def margin_histograms(margins: dict[str, list[float]]):
    """Reward(chosen) - reward(rejected) per aspect: mass right of zero is what the model got right."""
    figure, axes = plt.subplots(1, len(margins), figsize=(4.5 * len(margins), 3.2), squeeze=False)
    for axis, (aspect, values) in zip(axes[0], margins.items()):
        axis.hist(values, bins=20, color="tab:blue", alpha=0.8)
        axis.axvline(0, color="black", linewidth=1)
        axis.set_title(f"{aspect}: held-out reward margin")
        axis.set_xlabel("reward(chosen) - reward(rejected)")
    figure.tight_layout()
    return figure


def training_curves(stage_runs: dict[str, str], metric: str = "loss"):
    """The training loss of each stage, read back from its MLflow run."""
    client = MlflowClient()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for stage, run_id in stage_runs.items():
        history = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)
        if history:
            axis.plot([m.step for m in history], [m.value for m in history], marker=".", label=stage)
    axis.set_xlabel("step")
    axis.set_ylabel(metric)
    axis.set_title("training curves")
    if axis.lines:  # a run whose stages logged no loss yet (e.g. all resumed finished) draws no curve
        axis.legend()
    figure.tight_layout()
    return figure
