"""The statistics behind every comparison we print, against tabled values and by construction."""

import numpy as np
import pytest

from veclip.world.stats import holm, paired_bootstrap, paired_t, t_cdf, t_quantile


@pytest.mark.parametrize("df, q, tabled", [(1, 0.975, 12.706), (4, 0.975, 2.776), (9, 0.975, 2.262), (30, 0.95, 1.697)])
def test_t_quantiles_match_the_tables(df, q, tabled):
    assert t_quantile(q, df) == pytest.approx(tabled, abs=1e-3)
    assert t_cdf(0.0, df) == pytest.approx(0.5) and t_cdf(-tabled, df) == pytest.approx(1 - q, abs=1e-4)


def test_paired_t_on_known_differences():
    # differences 1, 2, 3, 4, 5: mean 3, sd 1.581, se 0.707, t = 4.243 on 4 df (p = 0.0132)
    result = paired_t([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert result.estimate == 3 and result.p == pytest.approx(0.0132, abs=5e-4)
    assert (result.low, result.high) == pytest.approx((3 - 2.776 * 0.7071, 3 + 2.776 * 0.7071), abs=1e-3)
    assert paired_t([1, 2], [1, 2]).p == 1.0  # no difference at all
    with pytest.raises(ValueError):
        paired_t([1], [0])


def test_paired_bootstrap_covers_the_true_difference():
    rng = np.random.default_rng(1)
    a = rng.random(500) < 0.6
    b = rng.random(500) < 0.4
    interval = paired_bootstrap(a, b)
    assert interval.low < interval.estimate < interval.high and interval.excludes_zero()
    assert interval.low < 0.2 < interval.high
    same = paired_bootstrap(a, a)
    assert (same.estimate, same.low, same.high) == (0, 0, 0) and not same.excludes_zero()


def test_holm_steps_down():
    assert holm([0.01, 0.04, 0.03, 0.2]) == [True, False, False, False]  # 0.01 < 0.05/4; 0.03 > 0.05/3
    assert holm([0.001, 0.012, 0.02]) == [True, True, True]  # 0.001 < .0167, 0.012 < 0.025, 0.02 < 0.05
