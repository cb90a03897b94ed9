"""Statistics over seeds: mean and standard deviation per method, and paired differences to the baseline.

Runs of the same seed share the initialisation seed, the data order and the dropout seed, so the seed is the
pairing unit: for a metric m, d_s = m(method, seed s) - m(baseline, seed s). ``paired`` reports the mean of
d, its sample standard deviation (ddof = 1), the two-sided 95 % confidence interval
mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n) (Student's t with n - 1 degrees of freedom) and the p-value of
the paired t-test of mean(d) = 0 (the same test as ``scipy.stats.ttest_rel``). With one seed there is no
interval (None).
"""
from __future__ import annotations

import math
from typing import Sequence


def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """{"mean", "std" (ddof = 1; None for one value), "n"}."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std: no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def paired(method: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """Paired difference method - baseline over seeds: {"mean", "std", "n", "ci_low", "ci_high", "t", "p"}."""
    from scipy import stats
    if len(method) != len(baseline):
        raise ValueError(f"paired: {len(method)} values against {len(baseline)} baseline values")
    d = [m - b for m, b in zip(method, baseline)]
    out = {**mean_std(d), "ci_low": None, "ci_high": None, "t": None, "p": None, "level": level}
    n = out["n"]
    if n < 2:
        return out
    se = out["std"] / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    out.update(ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    if se > 0:
        t = out["mean"] / se
        out.update(t=t, p=float(2 * stats.t.sf(abs(t), n - 1)))
    return out
