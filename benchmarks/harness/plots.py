"""Plots of benchmark results: headless matplotlib, PNGs rendered in memory and written atomically.

matplotlib is imported only here and only when a plot is drawn (the `bench` extra), so the
scripts and report.py import without it.
"""

from __future__ import annotations

import io
import os


def pyplot():
    """matplotlib.pyplot on the Agg backend: benchmark machines have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int) -> None:
    """Lay `fig` out, write it to `path` as a PNG and close it."""
    fig.tight_layout()
    buf = io.BytesIO()  # rendered in memory first, so a plotting error leaves the old file alone
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    from soco_llm.io.atomic import atomic_write_bytes  # here: importing soco_llm loads torch, report.py avoids it

    atomic_write_bytes(path, buf.getvalue())
