"""Shared matplotlib plumbing: a headless backend and one way to write a figure."""

from __future__ import annotations

from pathlib import Path

from dpfl.errors import ConfigError

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Writes ``fig`` at ``path`` (the format from its suffix, e.g. PNG) and closes it.

    A figure without a layout engine gets ``tight_layout`` first; one made with
    ``layout="constrained"`` keeps it (tight_layout ignores a suptitle and overlaps it).

    Raises:
        ConfigError: the file cannot be written, or matplotlib has no writer for the suffix.
    """
    plt = pyplot()
    out = Path(path)
    try:
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None
    except ValueError as e:  # an unsupported format: callers should check the suffix first
        raise ConfigError(f"cannot write {out}: {e}") from None
    finally:
        plt.close(fig)
    return out
