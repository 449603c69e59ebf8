"""``dpfl audit estimate``: epsilon from membership-inference counts (Bayesian and baselines)."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich.table import Table

from dpfl.cli.common import (
    DEFAULT_STORE,
    ConfigOption,
    JsonOption,
    PlotOption,
    SetOption,
    StoreOption,
    console,
)
from dpfl.cli.main import app
from dpfl.errors import ConfigError
from dpfl.jsonutil import dumps

audit_app = typer.Typer(help="Empirical privacy audits.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4f}"


@audit_app.command("estimate")
def estimate_cmd(
    tp: Annotated[int, typer.Option("--tp", help="Members guessed members.")],
    tn: Annotated[int, typer.Option("--tn", help="Non-members guessed non-members.")],
    fp: Annotated[int, typer.Option("--fp", help="Non-members guessed members.")],
    fn: Annotated[int, typer.Option("--fn", help="Members guessed non-members.")],
    delta: Annotated[float, typer.Option("--delta", "-d", help="delta, in (0, 1).")] = 1e-5,
    alpha: Annotated[
        float, typer.Option("--alpha", help="1 - credibility of the interval, in (0, 1).")
    ] = 0.05,
    method: Annotated[
        str, typer.Option("--method", help="joint-beta (default), joint-dirichlet, beta, jeffreys.")
    ] = "joint-beta",
    as_json: JsonOption = False,
) -> None:
    """Point estimate, credible interval and lower bound of epsilon from attack counts.

    The lower bound is 0 ("no evidence of leakage") whenever the counts show no advantage
    (TPR <= FPR): any posterior mass above 0 is then the prior's, not the data's."""
    from dpfl.audit import AttackCounts, estimate, verdict

    counts = AttackCounts(tp=tp, tn=tn, fp=fp, fn=fn)
    main = estimate(counts, delta, alpha, method)
    cp = estimate(counts, delta, alpha, "beta")
    jeffreys = estimate(counts, delta, alpha, "jeffreys")
    width, cp_width = main.hi - main.lo, cp.hi - cp.lo
    ratio = (
        width / cp_width
        if math.isfinite(width) and math.isfinite(cp_width) and cp_width > 0
        else None
    )
    bayesian = main.p_no_advantage is not None
    point_kind = {"beta": "plug-in", "jeffreys": "plug-in at the rates' Jeffreys medians"}.get(
        method, "posterior median"
    )
    says = verdict(counts, main)
    if as_json:
        console.print(
            dumps(
                {
                    "method": method,
                    "alpha": alpha,
                    "delta": delta,
                    "point": main.point,
                    "point_kind": point_kind,
                    "bayes_lo": main.lo,
                    "bayes_hi": main.hi,
                    "bayes_one_sided_lo": main.one_sided_lo,
                    "cp_point": cp.point,
                    "cp_lo": cp.lo,
                    "cp_hi": cp.hi,
                    "cp_one_sided_lo": cp.one_sided_lo,
                    "jeffreys_point": jeffreys.point,
                    "jeffreys_lo": jeffreys.lo,
                    "jeffreys_hi": jeffreys.hi,
                    "jeffreys_one_sided_lo": jeffreys.one_sided_lo,
                    "width_ratio_vs_cp": ratio,
                    "p_no_advantage": main.p_no_advantage,
                    "counts_show_advantage": main.counts_show_advantage,
                    "no_evidence": main.no_evidence,
                    "verdict": says,
                }
            ),
            markup=False,
        )
        return
    table = Table(
        title=f"epsilon from TP={tp} TN={tn} FP={fp} FN={fn} "
        f"(delta={delta:g}, {100 * (1 - alpha):g}% intervals)"
    )
    for col in ("method", "point", "lower", "upper", f"one-sided lower ({100 * (1 - alpha):g}%)"):
        table.add_column(col, justify="right" if col != "method" else "left")
    label = f"{method} (Bayesian)" if bayesian else method
    for name, iv in ((label, main), ("Clopper-Pearson", cp), ("Jeffreys", jeffreys)):
        table.add_row(name, _fmt(iv.point), _fmt(iv.lo), _fmt(iv.hi), _fmt(iv.one_sided_lo))
    console.print(table)
    console.print(f"point estimate ({point_kind}): {_fmt(main.point)}", markup=False)
    if bayesian:
        console.print(
            f"posterior probability of no advantage (epsilon = 0): {main.p_no_advantage:.4f}",
            markup=False,
        )
    if ratio is not None:
        console.print(f"interval width vs Clopper-Pearson: {ratio:.2f}x", markup=False)
    console.print(says, markup=False)


@audit_app.command("run")
def run_cmd(
    config: ConfigOption = None,
    overrides: SetOption = None,
    models: Annotated[int, typer.Option("--models", help="Models to train (K).")] = 2,
    canaries: Annotated[
        int, typer.Option("--canaries", help="Challenge points (mislabelled) per model.")
    ] = 100,
    shadow_fpr: Annotated[
        float, typer.Option("--shadow-fpr", help="Score attack: FPR targeted on shadow canaries.")
    ] = 0.1,
    alpha: Annotated[float, typer.Option("--alpha", help="1 - credibility, in (0, 1).")] = 0.05,
    as_json: JsonOption = False,
    plot: PlotOption = None,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Membership-inference audit of centralized (DP) training: canaries -> counts -> epsilon."""
    from dpfl.audit import verdict
    from dpfl.audit.game import run_audit
    from dpfl.config import load_config
    from dpfl.store import RunStore

    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha must be in (0, 1), got {alpha!r}")
    cfg = load_config(config, overrides or [])
    with RunStore(store) as s, s.run("audit", cfg.to_dict(), name=cfg.name, seed=cfg.seed) as run:
        result = run_audit(
            cfg, models=models, canaries=canaries, shadow_fpr=shadow_fpr, alpha=alpha
        )
        summary = {
            "run": run.run_id,
            "theoretical_epsilon": result.theoretical_epsilon,
            "models": models,
            "canaries_per_model": canaries,
            "attacks": {},
        }
        for attack, iv in result.intervals.items():
            c = result.counts[attack]
            summary["attacks"][attack] = {
                "tp": c.tp,
                "tn": c.tn,
                "fp": c.fp,
                "fn": c.fn,
                "point": iv.point,
                "bayes_lo": iv.lo,
                "bayes_hi": iv.hi,
                "bayes_one_sided_lo": iv.one_sided_lo,
                "cp_one_sided_lo": result.clopper_pearson[attack].one_sided_lo,
                "p_no_advantage": iv.p_no_advantage,
                "no_evidence": iv.no_evidence,
                "verdict": verdict(c, iv),
            }
            run.log_metrics(
                {
                    f"{attack}_eps_lower_bound": iv.one_sided_lo,
                    f"{attack}_eps_lo": iv.lo,
                    f"{attack}_eps_hi": iv.hi,
                }
            )
        run.finish("completed", summary=summary)
        if plot is not None:
            from dpfl.audit.plot import plot_posterior

            score = result.intervals["score"]
            plot_posterior(
                result.counts["score"],
                cfg.privacy.delta,
                plot,
                lower_bound=score.one_sided_lo,
                theoretical=result.theoretical_epsilon,
                title=f"score attack, run {run.run_id}",
            )
            run.add_artifact("plot", plot.name, plot.read_bytes(), media_type="image/png")
    if as_json:
        console.print(dumps(summary), markup=False)
        return
    table = Table(title=f"audit: {models} model(s) x {canaries} canaries (run {summary['run']})")
    for col in (
        "attack",
        "TP/TN/FP/FN",
        "point",
        f"{100 * (1 - alpha):g}% interval",
        "lower bound",
        "CP lower",
    ):
        table.add_column(col, no_wrap=col in ("TP/TN/FP/FN", f"{100 * (1 - alpha):g}% interval"))
    for attack, row in summary["attacks"].items():
        table.add_row(
            attack,
            f"{row['tp']}/{row['tn']}/{row['fp']}/{row['fn']}",
            _fmt(row["point"]),
            f"[{_fmt(row['bayes_lo'])}, {_fmt(row['bayes_hi'])}]",
            _fmt(row["bayes_one_sided_lo"]),
            _fmt(row["cp_one_sided_lo"]),
        )
    console.print(table)
    console.print(
        f"theoretical epsilon (accountant): {_fmt(result.theoretical_epsilon)}", markup=False
    )
    for attack, row in summary["attacks"].items():
        console.print(f"{attack}: {row['verdict']}", markup=False)
