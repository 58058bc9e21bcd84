"""loco_det.stats: closed-form cases and scipy.stats as the slow, obviously-correct reference."""
import math
import random

import pytest
import scipy.stats

from loco_det import stats


def test_paired_differences_1_2_3_closed_form():
    # d = [1, 2, 3]: mean 2, s = 1, t_{0.975, 2} = 4.302653, half-width 4.302653 / sqrt(3)
    c = stats.compare({0: 11.0, 1: 12.0, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert c.test == "paired" and c.df == 2
    assert c.diff == pytest.approx(2.0)
    assert c.halfwidth == pytest.approx(2.484, abs=5e-4)
    assert c.halfwidth == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-9)
    assert c.verdict == "better"


def test_single_run_is_not_resolved_and_has_no_interval():
    c = stats.compare({0: 5.0}, {0: 1.0, 1: 2.0})
    assert c.verdict == "not resolved (1 run)"
    assert c.halfwidth is None and c.low is None and c.diff == pytest.approx(3.5)


def test_verdicts():
    assert stats.verdict(0.1, 2.0) == "better"
    assert stats.verdict(-2.0, -0.1) == "worse"
    assert stats.verdict(-0.1, 0.1) == "not resolved"
    worse = stats.compare({0: 1.0, 1: 2.0, 2: 3.0}, {0: 3.0, 1: 5.0, 2: 6.0})
    assert worse.verdict == "worse"
    noisy = stats.compare({0: 1.0, 1: 5.0, 2: 2.0}, {0: 3.0, 1: 2.0, 2: 2.5})
    assert noisy.verdict == "not resolved"


def test_mean_std_closed_form():
    assert stats.mean_std([2.0, 4.0, 6.0]) == (4.0, 2.0, 3)
    assert stats.mean_std([7.5]) == (7.5, None, 1)
    with pytest.raises(ValueError):
        stats.mean_std([])


@pytest.mark.parametrize("p", [0.5, 0.8, 0.975, 0.995, 0.025])
def test_t_quantile_closed_forms(p):
    # df = 1 is the Cauchy distribution; df = 2 has t = (2p - 1) / sqrt(2p(1 - p))
    assert stats.t_ppf(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9, abs=1e-12)
    assert stats.t_ppf(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)),
                                              rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError):
        stats.t_ppf(1.0, 3)


def test_intervals_match_scipy_on_random_samples():
    rng = random.Random(1234)
    for _ in range(20):
        na, nb = rng.randint(2, 8), rng.randint(2, 8)
        a = [rng.gauss(3, rng.uniform(0.1, 3)) for _ in range(na)]
        b = [rng.gauss(2, rng.uniform(0.1, 3)) for _ in range(nb)]
        # Welch: scipy's ttest_ind(equal_var=False) confidence interval
        diff, half, df = stats.welch_interval(a, b)
        ref = scipy.stats.ttest_ind(a, b, equal_var=False)
        ci = ref.confidence_interval(0.95)
        assert df == pytest.approx(ref.df, rel=1e-10)
        assert diff - half == pytest.approx(ci.low, rel=1e-7, abs=1e-9)
        assert diff + half == pytest.approx(ci.high, rel=1e-7, abs=1e-9)
        # paired: ttest_rel on equal-length samples
        b2 = [x + rng.gauss(0.5, 1.0) for x in a]
        mean, half, df = stats.paired_interval([x - y for x, y in zip(a, b2)])
        ref = scipy.stats.ttest_rel(a, b2).confidence_interval(0.95)
        assert mean - half == pytest.approx(ref.low, rel=1e-7, abs=1e-9)
        assert mean + half == pytest.approx(ref.high, rel=1e-7, abs=1e-9)


def test_unshared_keys_use_welch():
    c = stats.compare({"s1": 1.0, "s2": 2.0, "s3": 3.0}, {"s4": 0.0, "s5": 0.5})
    assert c.test == "welch"
    ref = scipy.stats.ttest_ind([1, 2, 3], [0, 0.5], equal_var=False).confidence_interval(0.95)
    assert c.low == pytest.approx(ref.low, rel=1e-7)


def test_verdict_is_the_one_sided_5_percent_test():
    # one-sided p of ttest_rel decides; [1, 2, 3]: p = 0.037 -> better; [0.5, 2, 3.5]: not.
    for d, expected in (([1.0, 2.0, 3.0], "better"), ([0.5, 2.0, 3.5], "not resolved"),
                        ([-1.0, -2.0, -3.0], "worse")):
        c = stats.compare(dict(enumerate(d)), {i: 0.0 for i in range(3)})
        p_greater = scipy.stats.ttest_1samp(d, 0.0, alternative="greater").pvalue
        p_less = scipy.stats.ttest_1samp(d, 0.0, alternative="less").pvalue
        ref = "better" if p_greater < 0.05 else "worse" if p_less < 0.05 else "not resolved"
        assert c.verdict == ref == expected
