"""Confidence intervals for the evaluation's figures: a figure from a few dozen held-out pairs means
little without one. Percentile bootstrap over the evaluated items (pairs or prompts), seeded."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import BaseModel
from scipy.stats import bootstrap

RESAMPLES = 2000


class Estimate(BaseModel):
    value: float
    ci_low: float
    ci_high: float
    n: int

    def metrics(self, name: str) -> dict[str, float]:
        """`name`, `name.ci_low`, `name.ci_high`: the MLflow metric names."""
        return {name: self.value, f"{name}.ci_low": self.ci_low, f"{name}.ci_high": self.ci_high}

    @classmethod
    def from_metrics(cls, metrics: dict[str, float], name: str, n: int) -> Estimate:
        """The estimate that `metrics(name)` wrote."""
        return cls(value=metrics[name], ci_low=metrics[f"{name}.ci_low"], ci_high=metrics[f"{name}.ci_high"], n=n)

    def text(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"


def estimate(statistic: Callable[..., float], *samples: np.ndarray, seed: int = 0, level: float = 0.95) -> Estimate:
    """`statistic(*samples)` with a paired percentile-bootstrap interval (samples are resampled together,
    item by item). With fewer than two items, or no spread, the interval is the value itself."""
    arrays = [np.asarray(sample, dtype=float) for sample in samples]
    value = float(statistic(*arrays))
    n = len(arrays[0])
    if n < 2 or all(np.ptp(array) == 0 for array in arrays):
        return Estimate(value=value, ci_low=value, ci_high=value, n=n)
    result = bootstrap(
        arrays,
        statistic,
        paired=True,
        vectorized=False,
        n_resamples=RESAMPLES,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return Estimate(value=value, ci_low=float(low), ci_high=float(high), n=n)


def mean(values: np.ndarray, seed: int = 0) -> Estimate:
    return estimate(np.mean, values, seed=seed)
