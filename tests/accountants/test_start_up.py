"""Importing the accountants costs numpy and scipy, not torch: rdp runs on Opacus' RDP analysis
file loaded on its own, and Opacus / dp_accounting are imported only by the accountants that need
them. Results are those of Opacus' own module."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from dpfl.accountants import create_opacus_accountant
from dpfl.accountants import rdp as dpfl_rdp


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_rdp_epsilon_and_calibration_import_neither_torch_nor_opacus():
    result = _run(
        """
        import sys
        from dpfl.accountants import Phase, calibrate_noise, compute_epsilon
        eps = compute_epsilon([Phase(1.1, 0.01, 10_000)], 1e-5)
        cal = calibrate_noise(3.0, 1e-5, 0.01, 10_000)
        heavy = [m for m in ("torch", "opacus", "dp_accounting") if m in sys.modules]
        print(repr(eps), heavy)
        """
    )
    assert result.returncode == 0, result.stderr
    eps, heavy = result.stdout.split(maxsplit=1)
    assert heavy.strip() == "[]"
    assert 5.6 < float(eps) < 5.7  # Opacus' RDP epsilon for this history: 5.632


def _budget_imports(stub_main: bool) -> subprocess.CompletedProcess:
    stub = (
        """
        import types, typer
        main = types.ModuleType("dpfl.cli.main")
        main.app = typer.Typer()
        sys.modules["dpfl.cli.main"] = main
        """
        if stub_main
        else ""
    )
    return _run(
        "import sys\n"
        + textwrap.dedent(stub)
        + "import dpfl.cli.budget\n"
        + "print([m for m in ('torch', 'opacus', 'dp_accounting') if m in sys.modules])\n"
    )


def test_budget_module_itself_imports_no_torch():
    # dpfl.cli.main stubbed: only the budget module's own imports count
    result = _budget_imports(stub_main=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_budget_module_with_the_real_cli_imports_no_torch():
    main_alone = _run("import sys, dpfl.cli.main; print('torch' in sys.modules)")
    if main_alone.stdout.strip() != "False":
        pytest.skip("dpfl.cli.main itself imports torch (other commands not lazy yet)")
    result = _budget_imports(stub_main=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_default_orders_are_opacus_defaults():
    assert tuple(RDPAccountant.DEFAULT_ALPHAS) == dpfl_rdp._DEFAULT_ORDERS


def test_standalone_analysis_file_computes_what_opacus_module_does():
    standalone = dpfl_rdp._load_analysis_file()
    assert standalone is not None and standalone is not opacus_rdp
    orders = np.asarray(dpfl_rdp._DEFAULT_ORDERS + dpfl_rdp.LOW_ORDERS, dtype=float)
    for q, sigma, steps in [(0.01, 1.1, 10_000), (0.256, 57.0, 1000), (1.0, 2.0, 7)]:
        ours = standalone.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        assert np.array_equal(ours, theirs)
        assert standalone.get_privacy_spent(
            orders=orders, rdp=ours, delta=1e-5
        ) == opacus_rdp.get_privacy_spent(orders=orders, rdp=theirs, delta=1e-5)


@pytest.mark.parametrize(
    "name,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant), ("gdp", GaussianAccountant)]
)
def test_registry_still_builds_opacus_accountants(name, cls):
    acc = create_opacus_accountant(name)
    assert isinstance(acc, cls)


def test_pld_accountant_is_an_opacus_accountant():
    from dpfl.accountants.pld import PLDAccountant

    acc = create_opacus_accountant("pld")
    assert isinstance(acc, PLDAccountant) and isinstance(acc, IAccountant)
