"""Benchmarks run and print the figures they name (the timings themselves are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick(script: str) -> dict:
    """Runs ``benchmarks/<script> --quick``; returns the JSON object of its last line."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_accountants_benchmark_quick_prints_its_json_figures():
    figures = quick("accountants.py")
    for acc in ("rdp", "prv", "pld", "gdp"):
        for steps in ("1e3", "1e4", "1e5"):
            assert figures[f"{acc}_{steps}_s"] > 0
        assert figures[f"calibrate_{acc}_s"] > 0
    assert figures["calibrate_rdp_1e5_s"] > 0 and figures["calibrate_pld_1e5_s"] > 0
    # pld: an upper bound within 0.5 % of the fine dp_accounting reference on every case
    assert 1.0 <= figures["pld_vs_reference_min"] <= figures["pld_vs_reference_max"] <= 1.005


@pytest.mark.slow
def test_dp_overhead_benchmark_quick_prints_every_named_ratio():
    figures = quick("dp_overhead.py")
    for backend in ("hooks", "functorch", "ghost", "bk"):
        assert figures[f"cnn_{backend}_time_ratio"] > 0
        assert figures[f"cnn_{backend}_mem_ratio"] > 0
        assert figures[f"minilm_lora_{backend}_time_ratio"] > 0
    assert figures["minilm_lora_time_ratio"] == min(
        figures[f"minilm_lora_{b}_time_ratio"] for b in ("hooks", "functorch", "ghost", "bk")
    )


@pytest.mark.slow
def test_optimizers_benchmark_quick_prints_every_named_figure():
    figures = quick("optimizers.py")
    names = ["sgd_sai", "scale", "swan", "sinkgd", "frugal", "conda", "muon", "auon", "drop_muon"]
    for name in names:
        for key in ("state_bytes_per_param", "time_ratio_vs_adamw", "loss_ratio_vs_adamw"):
            assert f"{name}_{key}" in figures
    for name in ("scale", "swan", "sinkgd"):
        assert figures[f"{name}_state_bytes_per_param"] == 0.0
    assert figures["sgd_sai_state_bytes_per_param"] == 4.0


@pytest.mark.slow
def test_simulation_benchmark_quick_reproduces_the_plain_loop():
    figures = quick("simulation.py")
    assert figures["same_result_10"] and figures["same_result_100"]
    assert figures["overhead_ratio_100"] > 0 and figures["mem_ratio_1000_vs_10"] > 0


@pytest.mark.slow
def test_audit_benchmark_prints_time_and_width_ratio():
    figures = quick("audit.py")
    assert figures["interval_seconds"] > 0 and 0 < figures["width_ratio_vs_cp"] < 1


def test_startup_benchmark_prints_times_and_ratios_to_typer():
    figures = quick("startup.py")
    assert figures["import_typer"] > 0
    for name in ("dpfl_help", "dpfl_epsilon"):
        assert figures[f"{name}_vs_typer"] == figures[name] / figures["import_typer"]


@pytest.mark.slow
def test_default_lr_benchmark_quick_reports_the_tables_defaults():
    figures = quick("default_lr.py")
    from dpfl.optim.defaults import DEFAULT_LR

    for name in ("sgd", "adam"):
        for i, mode in enumerate(("dp", "plain")):
            row = figures[f"{name}/{mode}"]
            assert row["default_lr"] == DEFAULT_LR[name][i]
            assert row["accuracy_at_default"] >= 0.5


@pytest.mark.slow
def test_finetune_benchmark_quick_prints_every_named_ratio():
    figures = quick("finetune.py")
    for name in ("lora_time_ratio", "full_time_ratio", "full_mem_ratio"):
        assert figures[name] > 0
    # bytes are exact, not timings: adapters + head are a small fraction of the 22.7 M weights
    assert figures["lora_bytes_per_client"] < figures["full_bytes_per_client"]
    assert 0 < figures["lora_bytes_ratio"] < 0.01
    # FedSVD: 12 LoRA layers (query, value x 6); a reply without A: B (384 x 8 each) + head
    assert figures["fedsvd_lora_layers"] == 12
    b_and_head = 4 * (12 * 384 * 8 + 2 * 384 + 2)
    assert figures["fedsvd_upload_bytes_per_client"] == b_and_head
    lora_fedavg = b_and_head + 4 * 12 * 8 * 384
    assert figures["fedsvd_upload_bytes_ratio"] == pytest.approx(b_and_head / lora_fedavg, abs=1e-4)
    assert 0 < figures["fedsvd_server_seconds_per_round"] < 5
