"""The Bayesian epsilon estimate against the spec's worked values (dp_and_fl.md 5.4)."""

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from dpfl.audit import (
    AttackCounts,
    eps_from_fnr_fpr,
    estimate,
    posterior_cdf,
    posterior_quantile,
)
from dpfl.cli.main import app
from dpfl.errors import ConfigError
from tests.audit.reference import mc_eps, ref_cdf
from tests.cli.test_cli import assert_one_line_error

D = 1e-5


@pytest.mark.parametrize(
    "fnr,fpr,expected",
    [
        (0.1, 0.1, 2.1972134661633795),
        (0.3, 0.05, 2.639043043798931),
        (0.05, 0.3, 2.639043043798931),
        (0.5, 0.5, 0.0),
        (0.0, 0.2, math.inf),
        (0.7, 0.6, 0.6931305137543881),
    ],
)
def test_point_epsilon(fnr, fpr, expected):
    assert eps_from_fnr_fpr(fnr, fpr, D) == pytest.approx(expected, rel=1e-12)


# (TP, TN, FP, FN) -> CP, Jeffreys, joint-beta (quadrature reference column), one-sided joint-beta
CASES = [
    ((900, 900, 100, 100), (1.96176, 2.44564), (1.96681, 2.43951), (2.08513, 2.41771), 2.10952),
    ((600, 600, 400, 400), (0.25924, 0.55283), (0.26130, 0.55071), (0.32143, 0.50492), 0.33602),
    ((950, 990, 10, 50), (3.86043, 5.41545), (3.89562, 5.34175), (3.98409, 5.21657), 4.06589),
    # the paper's posterior (spec 5.4) gives [0.06687, 7.80254] and 0.14389 here (the reference
    # library 6.406 for the upper end); the attack's one-directional epsilon has Pr[eps = 0] =
    # 0.19157 (tests.audit.reference.ref_cdf, adaptive quadrature over FPR), so its lower ends
    # are 0 and its 97.5 % point is 7.80224 (ref_quantile)
    ((487, 1, 512, 0), (0.0, math.inf), (0.0, math.inf), (0.0, 7.80224), 0.0),
]


@pytest.mark.parametrize("counts,cp,jeffreys,bayes,one_sided", CASES)
def test_worked_values(counts, cp, jeffreys, bayes, one_sided):
    c = AttackCounts(*counts)
    for method, expected in (("beta", cp), ("jeffreys", jeffreys), ("joint-beta", bayes)):
        r = estimate(c, D, 0.05, method)
        assert (r.lo, r.hi) == pytest.approx(expected, abs=1e-4 if method == "joint-beta" else 1e-5)
    assert estimate(c, D, 0.05).one_sided_lo == pytest.approx(one_sided, abs=1e-4)
    assert estimate(c, D, 0.05, "joint-dirichlet").lo == estimate(c, D, 0.05).lo


def test_readme_case_at_alpha_01_and_frequentist_one_sided():
    r = estimate(AttackCounts(487, 1, 512, 0), D, 0.1)
    # the paper's posterior: [0.14389, 6.4156]; one-directional: 0 and ref_quantile's 6.41440
    assert (r.lo, r.hi) == pytest.approx((0.0, 6.41440), abs=1e-4)
    c = AttackCounts(900, 900, 100, 100)
    assert estimate(c, D, 0.05, "beta").one_sided_lo == pytest.approx(1.98969, abs=1e-5)
    assert estimate(c, D, 0.05, "jeffreys").one_sided_lo == pytest.approx(1.99480, abs=1e-5)


@pytest.mark.parametrize("counts", [c[0] for c in CASES])
def test_monte_carlo_cross_check(counts):
    c = AttackCounts(*counts)
    eps = mc_eps(counts, D)
    for q in (0.025, 0.5, 0.975):
        mc = float(np.quantile(eps, q))
        assert posterior_quantile(c, q, D) == pytest.approx(mc, abs=0.02, rel=0.01)


@pytest.mark.parametrize(
    "counts", [c[0] for c in CASES] + [(50, 50, 50, 50), (0, 1000, 0, 1000), (1, 206, 0, 193)]
)
def test_cdf_against_adaptive_quadrature_over_the_other_rate(counts):
    c = AttackCounts(*counts)
    for e in (0.0, 0.3, 2.2, 7.8):
        assert posterior_cdf(c, e, D) == pytest.approx(ref_cdf(counts, e, D), abs=1e-6)


def test_interval_is_monotone_in_alpha_and_narrows_with_more_samples():
    c = AttackCounts(900, 900, 100, 100)
    widths = [estimate(c, D, a).hi - estimate(c, D, a).lo for a in (0.01, 0.05, 0.2)]
    assert widths[0] > widths[1] > widths[2]
    intervals = [estimate(c, D, a) for a in (0.01, 0.05, 0.2)]
    assert intervals[0].lo < intervals[1].lo < intervals[2].lo
    big = AttackCounts(9000, 9000, 1000, 1000)  # same rates, 10x the samples
    r_small, r_big = estimate(c, D), estimate(big, D)
    assert r_big.hi - r_big.lo < 0.5 * (r_small.hi - r_small.lo)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tp": -1}, "--tp"),
        ({"tp": 0, "fn": 0}, "at least one member"),
        ({"fp": 1.5}, "--fp must be an integer"),
    ],
)
def test_bad_counts(kwargs, match):
    args = {"tp": 10, "tn": 10, "fp": 1, "fn": 1} | kwargs
    with pytest.raises(ConfigError, match=match):
        AttackCounts(**args)


def test_bad_alpha_delta_method():
    c = AttackCounts(1, 1, 1, 1)
    with pytest.raises(ConfigError, match="--alpha"):
        estimate(c, D, 1.0)
    with pytest.raises(ConfigError, match="--delta"):
        estimate(c, 1.0, 0.05)
    with pytest.raises(ConfigError, match="unknown method"):
        estimate(c, D, 0.05, "wald")


def test_cli_json_and_bad_input():
    runner = CliRunner()
    r = runner.invoke(
        app,
        ["audit", "estimate", "--tp", "900", "--tn", "900", "--fp", "100", "--fn", "100", "--json"],
    )
    import json

    out = json.loads(r.stdout)
    assert out["bayes_lo"] == pytest.approx(2.08513, abs=1e-4)
    assert out["cp_hi"] == pytest.approx(2.44564, abs=1e-5)
    assert out["width_ratio_vs_cp"] == pytest.approx(
        (2.41771 - 2.08513) / (2.44564 - 1.96176), abs=1e-3
    )
    for args, fragment in [
        (["--tp", "-1", "--tn", "1", "--fp", "1", "--fn", "1"], "--tp must be"),
        (["--tp", "0", "--tn", "0", "--fp", "0", "--fn", "0"], "at least one member"),
        (["--tp", "1", "--tn", "1", "--fp", "1", "--fn", "1", "--alpha", "0"], "--alpha"),
        (["--tp", "1", "--tn", "1", "--fp", "1", "--fn", "1", "--delta", "2"], "--delta"),
        (["--tp", "1", "--tn", "1", "--fp", "1"], "--fn"),
    ]:
        assert_one_line_error(runner.invoke(app, ["audit", "estimate", *args]), fragment)
