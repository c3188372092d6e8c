"""Paired statistics for with / without-tokens comparisons on the same prompts and seeds.

Two arms judged on the same (prompt, seed) pairs give paired 0/1 outcomes; the right test of a
difference in accuracy is McNemar's exact test on the discordant pairs (b: only arm B right,
c: only arm A right; under H0 each discordant pair is B-right with probability 1/2). The exact
two-sided binomial p-value is a short sum, written here with `math.comb` rather than adding scipy
as a dependency for one formula; `tests/test_stats.py` checks it against hand-computed values.

Example:
    >>> mcnemar_exact(10, 2)   # 10 pairs improved, 2 got worse
    0.03857421875
"""

from __future__ import annotations

import math
from typing import Sequence


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(min(B, C) <= min(b, c)) * 2 under Binomial(b + c, 1/2), capped at 1.

    Args:
        b: discordant pairs where only the second arm is right.
        c: discordant pairs where only the first arm is right.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> list[float]:
    """Wilson score interval of a binomial proportion (95% for the default z).

    (p + z^2/2n) / (1 + z^2/n) +- z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2), p = successes / n.
    Unlike the t (Wald) interval it never leaves [0, 1] and does not collapse to a point at p = 0
    or 1, so it stays meaningful for the few images of a smoke run.

    Args:
        successes: number of 1 outcomes.
        n: number of outcomes (>= 1).
        z: normal quantile of the two-sided level.
    """
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # exact arithmetic keeps p inside [center - half, center + half] within [0, 1]; the clamps only
    # remove round-off (p = 1 otherwise gives an upper bound of 0.9999999999999999 < mean)
    return [max(0.0, min(center - half, p)), min(1.0, max(center + half, p))]


def newcombe_paired_interval(a: Sequence[bool], b: Sequence[bool], z: float = 1.959964) -> tuple[float, float]:
    """95% interval of the paired difference mean(b) - mean(a) (Newcombe's method 10, with Wilson limits).

    Args:
        a, b: paired 0/1 outcomes of the two arms (same length, same order of pairs).
    """
    n = len(a)
    if n != len(b) or n == 0:
        raise ValueError(f"need two non-empty paired outcome lists of equal length, got {len(a)} and {len(b)}")
    pa, pb = sum(a) / n, sum(b) / n
    la, ua = wilson_interval(sum(a), n, z)
    lb, ub = wilson_interval(sum(b), n, z)
    n11 = sum(1 for x, y in zip(a, b) if x and y)
    n00 = sum(1 for x, y in zip(a, b) if not x and not y)
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n01 = n - n11 - n00 - n10
    den = (n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)
    phi = 0.0 if den == 0 else (n11 * n00 - n10 * n01) / math.sqrt(den)
    d = pb - pa
    lower = d - math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    upper = d + math.sqrt(max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2))
    return (lower, upper)


def paired_comparison(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Accuracy of each arm, the paired difference with its interval, discordant counts and McNemar p.

    Args:
        a: outcomes of the reference arm (e.g. vanilla), one per (prompt, seed).
        b: outcomes of the compared arm on the same pairs, in the same order.
    Returns:
        {"n", "acc_a", "acc_b", "delta", "delta_ci95", "b_only" (b right, a wrong), "a_only", "p_mcnemar"}.
    """
    n = len(a)
    if n != len(b) or n == 0:
        raise ValueError(f"need two non-empty paired outcome lists of equal length, got {len(a)} and {len(b)}")
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    return {"n": n, "acc_a": sum(a) / n, "acc_b": sum(b) / n, "delta": (sum(b) - sum(a)) / n,
            "delta_ci95": list(newcombe_paired_interval(a, b)), "b_only": b_only, "a_only": a_only,
            "p_mcnemar": mcnemar_exact(b_only, a_only)}


def format_p(p: float) -> str:
    """p-values as people read them: 3 significant digits, '< 1e-6' below that."""
    return "< 1e-6" if p < 1e-6 else f"{p:.3g}"


__all__ = ["format_p", "mcnemar_exact", "newcombe_paired_interval", "paired_comparison", "wilson_interval"]
