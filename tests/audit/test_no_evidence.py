"""No evidence is reported as no evidence, and every point estimate lies inside its interval.

Issue 10: an attack that never guesses "member" (TP 0, TN 1000, FP 0, FN 1000) got a positive
Bayesian lower bound on epsilon, and chance-level counts (50 each) a point estimate (0) below their
own interval. The expectations here come from closed forms (symmetry of the two rates' posteriors),
from the counts themselves (the maximum-likelihood rates) and from an independent Monte-Carlo
sampler of the rates' Beta posteriors with its own vectorized epsilon, not from the code under test.
"""

import itertools
import json
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dpfl.audit import METHODS, AttackCounts, estimate, posterior_cdf, posterior_quantile
from dpfl.cli.main import app
from tests.audit.reference import mc_eps

D = 1e-5


def shows_advantage(tp, tn, fp, fn, delta=D) -> bool:
    """TPR - FPR > delta at the maximum-likelihood rates, in exact arithmetic."""
    return Fraction(tp, tp + fn) - Fraction(fp, fp + tn) > Fraction(delta)


NO_ADVANTAGE = [
    (0, 1000, 0, 1000),  # never guesses "member"
    (50, 50, 50, 50),  # chance
    (1000, 0, 1000, 0),  # always guesses "member"
    (0, 0, 1000, 1000),  # always wrong (worse than chance)
    (0, 1000, 0, 1),  # one member, never guessed: the prior alone says "leak"
    (10, 90, 20, 90),  # a little worse than chance
    (487, 0, 513, 0),  # the reference library's README case with its one TN moved to FP
]


@pytest.mark.parametrize("counts", NO_ADVANTAGE)
@pytest.mark.parametrize("method", METHODS)
def test_counts_without_advantage_give_lower_bound_zero(counts, method):
    assert not shows_advantage(*counts)
    r = estimate(AttackCounts(*counts), D, 0.05, method)
    assert r.lo == 0.0 and r.one_sided_lo == 0.0, r
    assert r.no_evidence
    assert 0.0 <= r.point <= r.hi


def test_the_issues_cases():
    never = estimate(AttackCounts(0, 1000, 0, 1000), D)
    assert never.one_sided_lo == 0.0 and never.lo == 0.0
    chance = estimate(AttackCounts(50, 50, 50, 50), D)
    assert chance.lo <= chance.point <= chance.hi
    assert chance.lo == 0.0 and chance.point == 0.0


@pytest.mark.parametrize("counts", [(0, 1000, 0, 1000), (50, 50, 50, 50), (300, 700, 300, 700)])
def test_posterior_puts_half_its_mass_at_zero_on_symmetric_counts(counts):
    # TPR = 1 - FNR and FPR have the same Beta posterior here, so Pr[TPR <= FPR] = 1/2 exactly;
    # epsilon = 0 also on the delta-wide band 0 < TPR - FPR <= delta, hence a little more (at
    # the corner, where both rates are ~1e-4, delta = 1e-5 adds 0.018: see the Monte Carlo test)
    p0 = posterior_cdf(AttackCounts(*counts), 0.0, 1e-12)
    assert 0.5 <= p0 < 0.5 + 1e-4
    assert posterior_quantile(AttackCounts(*counts), 0.5, 1e-12) == 0.0


@pytest.mark.parametrize(
    "counts",
    [
        (900, 900, 100, 100),
        (487, 1, 512, 0),
        (50, 50, 50, 50),
        (0, 1000, 0, 1),
        (0, 1000, 0, 1000),
        (30, 180, 20, 170),
        (1, 206, 0, 193),
    ],
)
def test_posterior_against_an_independent_monte_carlo(counts):
    c = AttackCounts(*counts)
    eps = mc_eps(counts, D)
    assert posterior_cdf(c, 0.0, D) == pytest.approx(float(np.mean(eps == 0.0)), abs=3e-3)
    for q in (0.025, 0.05, 0.5, 0.975):
        mc = float(np.quantile(eps, q))
        assert posterior_quantile(c, q, D) == pytest.approx(mc, abs=0.02, rel=0.01)


def test_point_is_the_posterior_median():
    for counts in [(900, 900, 100, 100), (487, 1, 512, 0), (30, 180, 20, 170)]:
        c = AttackCounts(*counts)
        r = estimate(c, D)
        assert r.point == pytest.approx(float(np.median(mc_eps(counts, D))), abs=0.02, rel=0.01)
        assert r.lo <= r.point <= r.hi
    # the maximum-likelihood epsilon of (487, 1, 512, 0) is inf, outside [0, 7.9]: not the point
    assert math.isfinite(estimate(AttackCounts(487, 1, 512, 0), D).point)


def _check(counts, method, alpha):
    r = estimate(AttackCounts(*counts), D, alpha, method)
    assert r.lo <= r.point <= r.hi, (counts, method, alpha, r)
    assert r.lo <= r.one_sided_lo, (counts, method, alpha, r)
    assert r.lo >= 0.0
    if not shows_advantage(*counts):
        assert r.lo == 0.0 and r.one_sided_lo == 0.0, (counts, method, alpha, r)
    assert r.no_evidence == (r.one_sided_lo == 0.0)


def _grid(values_members, values_non_members):
    for tp, fn in itertools.product(values_members, repeat=2):
        for tn, fp in itertools.product(values_non_members, repeat=2):
            if tp + fn and tn + fp:
                yield tp, tn, fp, fn


@pytest.mark.parametrize("method", ["joint-beta", "beta", "jeffreys"])
def test_grid_point_inside_interval_and_no_advantage_gives_zero(method):
    for counts in _grid((0, 1, 1000), (0, 700)):
        _check(counts, method, 0.05)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.01, 0.9])
@pytest.mark.parametrize("method", ["joint-beta", "beta", "jeffreys"])
def test_grid_wider(method, alpha):
    for counts in _grid((0, 1, 5, 60, 1000), (0, 7, 999)):
        _check(counts, method, alpha)


def test_clear_leakage_is_still_found():
    # 90 % TPR at 10 % FPR over 2,000 samples: the 95 % lower bound of the worked case (spec 5.4)
    r = estimate(AttackCounts(900, 900, 100, 100), D)
    assert not r.no_evidence
    assert r.one_sided_lo == pytest.approx(2.10952, abs=1e-4)


runner = CliRunner()


def _estimate(*counts, extra=()):
    tp, tn, fp, fn = map(str, counts)
    args = ["audit", "estimate", "--tp", tp, "--tn", tn, "--fp", fp, "--fn", fn, *extra]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r


def test_cli_says_no_evidence_and_what_the_prior_does():
    r = _estimate(0, 1000, 0, 1000, extra=["--delta", "1e-5"])
    text = " ".join(r.stdout.split())
    assert "no evidence of leakage (lower bound 0)" in text
    assert "prior" in text
    out = json.loads(_estimate(0, 1000, 0, 1000, extra=["--json", "--delta", "1e-12"]).stdout)
    assert out["no_evidence"] is True
    assert out["bayes_lo"] == out["bayes_one_sided_lo"] == out["cp_one_sided_lo"] == 0.0
    assert out["bayes_lo"] <= out["point"] <= out["bayes_hi"]
    assert out["p_no_advantage"] == pytest.approx(0.5, abs=1e-4)  # symmetry (see above)
    assert "no evidence of leakage (lower bound 0)" in out["verdict"]
    # one member, never guessed: the posterior's mass away from 0 is the prior's
    out = json.loads(_estimate(0, 1000, 0, 1, extra=["--json"]).stdout)
    assert out["no_evidence"] is True and out["bayes_one_sided_lo"] == 0.0
    assert out["p_no_advantage"] < 0.05
    assert "prior" in out["verdict"]


def test_cli_reports_evidence_when_there_is_some():
    out = json.loads(_estimate(900, 900, 100, 100, extra=["--json"]).stdout)
    assert out["no_evidence"] is False
    assert out["bayes_one_sided_lo"] == pytest.approx(2.10952, abs=1e-4)
    assert out["bayes_lo"] <= out["point"] <= out["bayes_hi"]
    assert out["verdict"].startswith("evidence of leakage")
    text = " ".join(_estimate(900, 900, 100, 100).stdout.split())
    assert "evidence of leakage: epsilon >= 2.1095" in text
    assert "no evidence" not in text


def test_cli_table_point_inside_interval_for_chance_counts():
    out = json.loads(_estimate(50, 50, 50, 50, extra=["--json"]).stdout)
    for prefix in ("bayes", "cp", "jeffreys"):
        point = out["point"] if prefix == "bayes" else out[f"{prefix}_point"]
        assert out[f"{prefix}_lo"] <= point <= out[f"{prefix}_hi"]
        assert out[f"{prefix}_lo"] == out[f"{prefix}_one_sided_lo"] == 0.0


def _readme_audit_examples():
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("\n## Audits\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```\n(.+?)\n```", section, flags=re.S)[0]
    examples = []
    for chunk in block.split("$ ")[1:]:
        command, *expected = chunk.strip().splitlines()
        examples.append((command.split("#")[0].split()[1:], expected))
    return section, examples


def test_readme_audit_section_matches_the_cli():
    section, examples = _readme_audit_examples()
    assert len(examples) == 2
    for args, expected in examples:
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        actual = " ".join(r.stdout.replace("│", " ").replace("┃", " ").split())
        lines, table = [], []
        for line in expected:
            (table if line.startswith("  ") else lines).append(" ".join(line.split()))
        for row in table:  # table rows: the same cells in the same order
            assert row in actual, row
        assert " ".join(lines) in actual
    keys = set(re.findall(r"`([a-z_]+)`", section.split("`--json` gives", 1)[1].split("\n\n")[0]))
    out = json.loads(_estimate(900, 900, 100, 100, extra=["--json"]).stdout)
    for key in keys - {"joint", "jeffreys"}:
        assert key in out, key
    for prefix in ("cp", "jeffreys"):
        for suffix in ("point", "lo", "hi", "one_sided_lo"):
            assert f"{prefix}_{suffix}" in out
