"""The benchmarks' shared plotting steps (matplotlib is optional: the GPU image has it, CI does not)."""


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (the reason printed) where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001 — a plot is optional
        print(f"(no plot: {exc!r})")
        return None
    return plt


def save(fig, path, title=""):
    """Title, lay out, write (110 dpi) and close ``fig``; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
