"""Matplotlib figures as PNG bytes, for reports and the charts written beside them."""

from __future__ import annotations

import io


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (110 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
