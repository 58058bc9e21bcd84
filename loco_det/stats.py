"""Small pure statistics for the report: mean/std, Student-t intervals, verdicts.

Why its own module: every number the report prints comes from these few lines, tested against
closed-form cases and against scipy.stats (tests/test_stats.py). The t quantiles are scipy's;
the readouts' binomial standard error is here too.
Higher is better for every metric compared here (AP, top-1).

Interval and verdict: the report prints the two-sided 95% t interval of the difference A - B.
The verdict is a one-sided t test at the 5% level in the direction of the observed difference:
"better" when the one-sided 95% lower bound, diff - t_{0.95, df} * se, is above 0 ("worse"
symmetrically), else "not resolved". The verdict can therefore be "better" while the two-sided
95% interval still reaches 0 (differences [1, 2, 3]: 2 +- 2.484, one-sided bound 0.31 > 0).
"""
import math
from dataclasses import dataclass

CONFIDENCE = 0.95


def mean_std(values):
    """(mean, sample std with ddof=1 or None when n < 2, n) of a non-empty sequence."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None, n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)), n


def t_ppf(p, df):
    """Quantile of Student's t with `df` (> 0, not necessarily integer) degrees of freedom."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_ppf: p={p} is not in (0, 1)")
    import scipy.stats   # here: it takes seconds to import, and only the report needs it

    return float(scipy.stats.t.ppf(p, df))


@dataclass
class Comparison:
    """Difference a - b of means with its t interval. halfwidth/df are None without one."""
    diff: float
    halfwidth: object
    df: object
    test: str          # "paired" | "welch" | "-"
    n_a: int
    n_b: int
    verdict: str

    @property
    def low(self):
        return None if self.halfwidth is None else self.diff - self.halfwidth

    @property
    def high(self):
        return None if self.halfwidth is None else self.diff + self.halfwidth


def binomial_stderr(accuracy, n):
    """Standard error, in percentage points, of an accuracy in % measured on n items."""
    return 100.0 * math.sqrt(accuracy / 100 * (1 - accuracy / 100) / n)


def paired_se(diffs):
    """(mean, standard error s_d / sqrt(n), df = n - 1) of per-pair differences; n >= 2."""
    mean, std, n = mean_std(diffs)
    if n < 2:
        raise ValueError("paired test needs at least 2 pairs")
    return mean, std / math.sqrt(n), n - 1


def welch_se(a, b):
    """(mean(a) - mean(b), se, Welch-Satterthwaite df): se^2 = s_a^2/n_a + s_b^2/n_b,
    df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)). Needs n >= 2 on both sides.
    Both variances 0: se 0 and df = n_a + n_b - 2."""
    ma, sa, na = mean_std(a)
    mb, sb, nb = mean_std(b)
    if na < 2 or nb < 2:
        raise ValueError("Welch's test needs at least 2 values on each side")
    va, vb = sa * sa / na, sb * sb / nb
    se2 = va + vb
    if se2 == 0.0:
        return ma - mb, 0.0, float(na + nb - 2)
    return ma - mb, math.sqrt(se2), se2 * se2 / (va * va / (na - 1) + vb * vb / (nb - 1))


def paired_interval(diffs, confidence=CONFIDENCE):
    """(mean, half-width, df) of the two-sided paired t interval over differences d_i:
    mean(d) +- t_{(1+c)/2, n-1} * s_d / sqrt(n)."""
    mean, se, df = paired_se(diffs)
    return mean, t_ppf(0.5 + confidence / 2.0, df) * se, df


def welch_interval(a, b, confidence=CONFIDENCE):
    """(mean(a) - mean(b), half-width, df) of the two-sided Welch t interval."""
    diff, se, df = welch_se(a, b)
    return diff, t_ppf(0.5 + confidence / 2.0, df) * se, df


def verdict(low, high):
    """'better' when the one-sided bound `low` is above 0, 'worse' when `high` is below 0."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "not resolved"


def compare(a, b, confidence=CONFIDENCE):
    """Compare method A with B, higher is better.

    `a`, `b`: {pair key: value}. When both have the same keys (shared seeds or splits), n >= 2,
    the test is paired over the keys; otherwise Welch's over the two samples. With a single
    run on either side there is no interval: verdict "not resolved (1 run)"."""
    va, vb = list(a.values()), list(b.values())
    diff = mean_std(va)[0] - mean_std(vb)[0]
    if len(va) < 2 or len(vb) < 2:
        return Comparison(diff, None, None, "-", len(va), len(vb), "not resolved (1 run)")
    if set(a) == set(b):
        d, se, df = paired_se([a[k] - b[k] for k in sorted(a, key=str)])
        test = "paired"
    else:
        d, se, df = welch_se(va, vb)
        test = "welch"
    half = t_ppf(0.5 + confidence / 2.0, df) * se
    one_sided = t_ppf(confidence, df) * se
    return Comparison(d, half, df, test, len(va), len(vb), verdict(d - one_sided, d + one_sided))
