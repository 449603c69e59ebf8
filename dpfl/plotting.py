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
    """Writes ``fig`` as a PNG at ``path`` and closes it; a write failure is a ConfigError."""
    plt = pyplot()
    out = Path(path)
    try:
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out
