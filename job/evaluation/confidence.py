"""How sure a rate is: percentile bootstrap intervals, and an exact McNemar test for paired tuned-vs-base rows.

With 100 rows, a 95% interval on an accuracy near 20% is about +/-8 pp wide, so a +5 pp difference between two
models is noise; `paired_comparison` says so in words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CONFIDENCE = 0.95
N_RESAMPLES = 2000
ALPHA = 1 - CONFIDENCE


def bootstrap_interval(
    flags: Sequence[bool], *, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> list[float] | None:
    """95% percentile-bootstrap interval [low, high] of the share of True in `flags`; None when empty."""
    import numpy as np

    values = np.asarray([bool(f) for f in flags], dtype=np.float64)
    if values.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    low, high = np.quantile(means, [ALPHA / 2, 1 - ALPHA / 2])
    return [float(low), float(high)]


def mcnemar_exact_p(base_only: int, tuned_only: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs against Binomial(n, 1/2)."""
    n = base_only + tuned_only
    if n == 0:
        return 1.0
    k = min(base_only, tuned_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(
    base: Sequence[bool], tuned: Sequence[bool], *, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> dict:
    """tuned - base on the same rows: difference, its paired-bootstrap 95% interval, exact McNemar p-value,
    and a sentence saying whether the difference is within noise (p >= 0.05)."""
    import numpy as np

    if len(base) != len(tuned):
        raise ValueError("paired comparison needs one base and one tuned flag per row")
    b = np.asarray([bool(x) for x in base], dtype=np.float64)
    t = np.asarray([bool(x) for x in tuned], dtype=np.float64)
    n = int(b.size)
    if n == 0:
        return {"n_pairs": 0, "delta": None, "ci95": None, "p_value": None, "test": "exact McNemar",
                "within_noise": None, "statement": "no paired rows"}
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(n_resamples, n))
    diffs = (t[index] - b[index]).mean(axis=1)
    low, high = (float(x) for x in np.quantile(diffs, [ALPHA / 2, 1 - ALPHA / 2]))
    base_only, tuned_only = int(((b == 1) & (t == 0)).sum()), int(((b == 0) & (t == 1)).sum())
    p_value = mcnemar_exact_p(base_only, tuned_only)
    delta = float(t.mean() - b.mean())
    within_noise = p_value >= ALPHA
    if within_noise:
        statement = (f"The difference of {100 * delta:+.1f} pp is within noise on these {n} rows (exact McNemar "
                     f"p = {p_value:.2g}; 95% interval {100 * low:+.1f} to {100 * high:+.1f} pp): it does not show "
                     "that one model is better.")
    else:
        better = "tuned" if delta > 0 else "base"
        statement = (f"The {better} model is better by {100 * abs(delta):.1f} pp on these {n} rows, beyond noise "
                     f"(exact McNemar p = {p_value:.2g}; 95% interval {100 * low:+.1f} to {100 * high:+.1f} pp).")
    return {"n_pairs": n, "delta": delta, "ci95": [low, high], "p_value": p_value, "test": "exact McNemar",
            "base_only": base_only, "tuned_only": tuned_only, "within_noise": within_noise, "statement": statement}
