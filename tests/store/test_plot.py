"""Structure of the run plots (``dpfl train --plot``, ``dpfl runs plot``): which panels, axis
labels, how many lines, where the final values sit. The figure is captured where it is saved, so
these tests read what the plot function built, not pixels."""

from __future__ import annotations

import math

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

import dpfl.store.plot as plot_mod
from dpfl.errors import ConfigError
from dpfl.store import RunStore, run_to_dict

Q = 0.1  # sample rate of the synthetic train run: one expected epoch = 1 / Q = 10 steps
STEPS = 23  # noisy steps of the synthetic train run: 2.3 expected epochs


def _event(seq, who, steps, eps, round=None, q=Q):
    return {
        "seq": seq,
        "participant": who,
        "mechanism": "subsampled-gaussian",
        "noise_multiplier": 1.0,
        "sample_rate": q,
        "steps": steps,
        "accountant": "rdp",
        "delta": 1e-5,
        "epsilon_after": eps,
        "round": round,
    }


@pytest.fixture
def captured(monkeypatch):
    """Figures handed to save_figure (they are still saved, so layout has run)."""
    figures = []
    original = plot_mod.save_figure

    def keep(fig, path):
        figures.append(fig)
        return original(fig, path)

    monkeypatch.setattr(plot_mod, "save_figure", keep)
    return figures


@pytest.fixture
def train_doc(store_path):
    """What ``dpfl train --epochs 2`` records: per-epoch test metrics and epsilon (round = epoch),
    final values without a position, one ledger event per noisy step."""
    with RunStore(store_path) as store, store.run("train", {"seed": 0}) as run:
        for i in range(STEPS):
            run.record_privacy_event(_event(i, "central", 1, 1.0 + 0.1 * i))
        for epoch, (acc, loss) in enumerate([(0.5, 2.0), (0.7, 1.5)], start=1):
            run.log_metrics(
                {"test_accuracy": acc, "test_loss": loss, "epsilon": 1.0 + epoch}, round=epoch
            )
        run.log_metrics(
            {"test_accuracy": 0.72, "test_loss": 1.4, "epsilon": 3.2, "steps": float(STEPS)},
            scope="final",
        )
        return run_to_dict(store, run.run_id)


def _simulate_doc(store_path, client_eps):
    """A 3-round simulation: server metrics per round (clients and dropped constant), one ledger
    event per client per round; ``client_eps(client, round)`` gives each epsilon."""
    with RunStore(store_path) as store, store.run("simulate", {"seed": 0}) as run:
        seq = 0
        for r in (1, 2, 3):
            run.start_round(r)
            for c in range(10):
                run.record_privacy_event(_event(seq, f"client-{c}", 12, client_eps(c, r), round=r))
                seq += 1
            row = {
                "accuracy": [0.24, 0.56, 0.54][r - 1],
                "loss": [2.17, 1.8, 1.47][r - 1],
                "clients": 10.0,
                "dropped": 0.0,
                "epsilon-max": max(client_eps(c, r) for c in range(10)),
            }
            run.log_metrics(row, round=r, scope="server")
            run.end_round(r, info={"sampled": 10, "dropped": []})
        return run_to_dict(store, run.run_id)


def _data_axes(fig):
    return [ax for ax in fig.axes if ax.axison]


def _all_text(fig):
    texts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        texts += [t.get_text() for t in ax.texts]
        legend = ax.get_legend()
        if legend is not None:
            texts += [t.get_text() for t in legend.get_texts()]
    return "\n".join(texts)


def _epsilon_axes(fig):
    return [ax for ax in _data_axes(fig) if "epsilon" in ax.get_ylabel()]


def _axes_for(fig, name):
    found = [ax for ax in _data_axes(fig) if ax.get_ylabel() == name]
    assert len(found) == 1, [ax.get_ylabel() for ax in _data_axes(fig)]
    return found[0]


# -- train --------------------------------------------------------------------------------------
def test_train_plot_has_one_epsilon_panel_and_epoch_axes(train_doc, captured, tmp_path):
    plot_mod.plot_run(train_doc, tmp_path / "t.png")
    (fig,) = captured
    assert len(_epsilon_axes(fig)) == 1
    for ax in _data_axes(fig):
        assert ax.get_xlabel() == "epoch", ax.get_ylabel()


def test_train_final_values_sit_at_the_end_of_training(train_doc, captured, tmp_path):
    plot_mod.plot_run(train_doc, tmp_path / "t.png")
    (fig,) = captured
    end = STEPS * Q  # expected passes over the data after STEPS steps at sample rate Q
    for name, final in (("test_accuracy", 0.72), ("test_loss", 1.4)):
        ax = _axes_for(fig, name)
        at_end = [
            ln
            for ln in ax.get_lines()
            if list(ln.get_xdata()) == pytest.approx([end]) and list(ln.get_ydata()) == [final]
        ]
        assert len(at_end) == 1, [(ln.get_xdata(), ln.get_ydata()) for ln in ax.get_lines()]
        # and nothing of the panel lies beyond the end of training
        assert max(max(ln.get_xdata()) for ln in ax.get_lines()) == pytest.approx(end)


def test_train_scalar_without_a_series_is_text_not_a_panel(train_doc, captured, tmp_path):
    plot_mod.plot_run(train_doc, tmp_path / "t.png")
    (fig,) = captured
    assert "steps" not in [ax.get_ylabel() for ax in _data_axes(fig)]
    assert "steps (final) = 23" in _all_text(fig)


def test_train_epsilon_panel_runs_to_the_end_in_epochs(train_doc, captured, tmp_path):
    plot_mod.plot_run(train_doc, tmp_path / "t.png")
    (ax,) = _epsilon_axes(captured[0])
    xs = [x for ln in ax.get_lines() for x in ln.get_xdata()]
    assert max(xs) == pytest.approx(STEPS * Q) and min(xs) == pytest.approx(Q)


def test_non_private_train_final_values_sit_at_the_planned_end(store_path, captured, tmp_path):
    # no ledger: the end is the planned epochs scaled by steps done / planned (2 x 18/24 = 1.5)
    config = {"training": {"epochs": 2.0}, "privacy": {"enabled": False}}
    with RunStore(store_path) as store, store.run("train", config) as run:
        run.log_metrics({"test_accuracy": 0.3, "test_loss": 1.9}, round=1)
        run.log_metrics({"test_accuracy": 0.46, "test_loss": 1.3, "steps": 18.0}, scope="final")
        run.finish("completed", summary={"steps": 18, "steps_planned": 24})
        doc = run_to_dict(store, run.run_id)
    plot_mod.plot_run(doc, tmp_path / "n.png")
    (fig,) = captured
    assert _epsilon_axes(fig) == []
    ax = _axes_for(fig, "test_accuracy")
    finals = [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [0.46]]
    assert [list(ln.get_xdata()) for ln in finals] == [[1.5]]
    assert ax.get_xlabel() == "epoch"
    assert "epsilon = inf" in _all_text(fig)


# -- simulate -----------------------------------------------------------------------------------
def test_simulate_constant_metrics_are_text_not_panels(store_path, captured, tmp_path):
    doc = _simulate_doc(store_path, lambda c, r: 5.0 + r)
    plot_mod.plot_run(doc, tmp_path / "s.png")
    (fig,) = captured
    labels = [ax.get_ylabel() for ax in _data_axes(fig)]
    assert "clients" not in labels and "dropped" not in labels
    text = _all_text(fig)
    assert "clients = 10" in text and "dropped = 0" in text
    assert {"accuracy", "loss"} <= set(labels)
    assert "epsilon-max" not in labels  # the ledger's epsilon panel shows it, once
    assert len(_epsilon_axes(fig)) == 1
    for ax in _data_axes(fig):
        assert ax.get_xlabel() == "round"


def test_equal_clients_are_one_line_with_a_note(store_path, captured, tmp_path):
    doc = _simulate_doc(store_path, lambda c, r: 5.0 + r)
    plot_mod.plot_run(doc, tmp_path / "s.png")
    (ax,) = _epsilon_axes(captured[0])
    assert len(ax.get_lines()) == 1
    assert list(ax.get_lines()[0].get_ydata()) == [6.0, 7.0, 8.0]
    assert "all 10 clients equal" in _all_text(captured[0])


def test_unequal_clients_show_min_median_max(store_path, captured, tmp_path):
    # client c after round r: r * (1 + c / 9): min r, max 2r, median (clients 4 and 5) r * 1.5
    doc = _simulate_doc(store_path, lambda c, r: r * (1 + c / 9))
    plot_mod.plot_run(doc, tmp_path / "s.png")
    (ax,) = _epsilon_axes(captured[0])
    assert len(ax.get_lines()) <= 3  # not one line per client
    by_label = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    median = [v for k, v in by_label.items() if "median" in k]
    assert median == [pytest.approx([1.5, 3.0, 4.5])]
    assert len(ax.collections) == 1  # the min-max band
    band = ax.collections[0].get_paths()[0].vertices
    assert min(band[:, 1]) == pytest.approx(1.0) and max(band[:, 1]) == pytest.approx(6.0)
    assert "min" in _all_text(captured[0]) and "max" in _all_text(captured[0])


def test_title_does_not_overlap_the_first_panel(store_path, captured, tmp_path):
    doc = _simulate_doc(store_path, lambda c, r: 5.0 + r)
    plot_mod.plot_run(doc, tmp_path / "s.png")
    (fig,) = captured
    canvas = FigureCanvasAgg(fig)  # a fresh canvas: save_figure has closed the figure
    canvas.draw()
    renderer = canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    top = max(_data_axes(fig), key=lambda ax: ax.get_position().y1)
    panel = top.get_tightbbox(renderer)
    assert title.y0 >= panel.y1 - 0.5, (title, panel)


def test_many_client_diagnostics_are_a_band_not_ten_lines(store_path, captured, tmp_path):
    with RunStore(store_path) as store, store.run("simulate", {"seed": 0}) as run:
        for r in (1, 2):
            for c in range(10):
                run.log_metrics({"uncovered/train-loss": 2.0 / r + c}, round=r, scope=f"client-{c}")
        doc = run_to_dict(store, run.run_id)
    plot_mod.plot_run(doc, tmp_path / "d.png")
    ax = _axes_for(captured[0], "uncovered/train-loss")
    assert len(ax.get_lines()) <= 3 and len(ax.collections) == 1
    assert "NOT covered" in ax.get_title()


def test_nothing_to_plot_and_unknown_metric_are_config_errors(store_path, tmp_path):
    with RunStore(store_path) as store, store.run("train", {}) as run:
        run.log_metrics({"accuracy": 0.5}, round=1)
        empty = store.create_run("train", {})
        doc, blank = run_to_dict(store, run.run_id), run_to_dict(store, empty.run_id)
    with pytest.raises(ConfigError, match="run has no metric loss; recorded: accuracy"):
        plot_mod.plot_run(doc, tmp_path / "x.png", ["loss"])
    with pytest.raises(ConfigError, match="nothing to plot"):
        plot_mod.plot_run(blank, tmp_path / "x.png")


def test_scalar_only_run_is_a_text_figure(store_path, captured, tmp_path):
    with RunStore(store_path) as store, store.run("epsilon", {}) as run:
        run.log_metrics({"rdp": 7.329, "prv": math.inf})
        doc = run_to_dict(store, run.run_id)
    plot_mod.plot_run(doc, tmp_path / "e.png")
    assert _data_axes(captured[0]) == []
    assert "rdp = 7.329" in _all_text(captured[0]) and "prv = inf" in _all_text(captured[0])


# -- the output path ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a.png", "a.PNG", "a.svg", "a.pdf"])
def test_check_plot_path_accepts_the_allowed_formats(tmp_path, name):
    assert plot_mod.check_plot_path(tmp_path / name) == tmp_path / name


@pytest.mark.parametrize("name", ["x.txt", "x", "x.jpg", "x.png.bak"])
def test_check_plot_path_names_the_allowed_suffixes(tmp_path, name):
    with pytest.raises(ConfigError, match=r"\.png, \.svg or \.pdf"):
        plot_mod.check_plot_path(tmp_path / name)


def test_check_plot_path_refuses_missing_folders_and_directories(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        plot_mod.check_plot_path(tmp_path / "no" / "such" / "x.png")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        plot_mod.check_plot_path(tmp_path / "d.png")


@pytest.mark.parametrize("name", ["a.png", "a.svg", "a.pdf"])
def test_each_allowed_format_is_written(store_path, tmp_path, name):
    doc = _simulate_doc(store_path, lambda c, r: 5.0 + r)
    out = plot_mod.plot_run(doc, tmp_path / name)
    head = out.read_bytes()[:5]
    assert head == {"a.png": b"\x89PNG\r", "a.svg": b"<?xml", "a.pdf": b"%PDF-"}[name]


# -- epsilon not recorded per event (accountants other than rdp) ---------------------------------
def _unrecorded_train_doc(store_path, n, accountant, sigma=2.0, q=1.0):
    with RunStore(store_path) as store, store.run("train", {}) as run:
        for i in range(n):
            event = _event(i, "central", 1, None, q=q) | {
                "accountant": accountant,
                "noise_multiplier": sigma,
            }
            run.record_privacy_event(event)
        return run_to_dict(store, run.run_id)


def test_unrecorded_epsilons_are_recomputed_from_the_history(store_path, captured, tmp_path):
    from tests.reference import exact_gaussian_epsilon, gaussian_mu

    doc = _unrecorded_train_doc(store_path, 5, "pld")
    plot_mod.plot_run(doc, tmp_path / "u.png")
    (ax,) = _epsilon_axes(captured[0])
    (line,) = ax.get_lines()
    # q = 1: T releases at sigma 2 are one Gaussian mechanism with mu = sqrt(T) / 2, exactly
    exact = [exact_gaussian_epsilon(gaussian_mu([(2.0, t)]), 1e-5) for t in range(1, 6)]
    assert list(line.get_xdata()) == pytest.approx([1, 2, 3, 4, 5])  # q = 1: one pass per step
    for got, want in zip(line.get_ydata(), exact, strict=True):
        assert want <= got <= want * 1.01  # pld is pessimistic, and tight


def test_recomputation_is_capped_and_keeps_the_last_event(store_path, captured, tmp_path):
    doc = _unrecorded_train_doc(store_path, 200, "rdp", sigma=1.0, q=0.01)
    plot_mod.plot_run(doc, tmp_path / "u.png")
    (ax,) = _epsilon_axes(captured[0])
    xs = list(ax.get_lines()[0].get_xdata())
    assert len(xs) <= plot_mod.MAX_RECOMPUTED + 1
    assert xs[-1] == pytest.approx(200 * 0.01)


def test_no_noise_is_a_note_not_a_flat_line(store_path, captured, tmp_path):
    with RunStore(store_path) as store, store.run("train", {}) as run:
        run.record_privacy_event(_event(0, "central", 3, math.inf) | {"noise_multiplier": 0.0})
        doc = run_to_dict(store, run.run_id)
    plot_mod.plot_run(doc, tmp_path / "z.png")
    assert _epsilon_axes(captured[0]) == []
    assert "epsilon infinite (no privacy) for 1 of 1" in _all_text(captured[0])
