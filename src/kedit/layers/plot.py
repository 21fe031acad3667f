"""One figure per ``kedit layers`` run: a panel per strategy, score against layer, choice marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = {
    "lga": "LGA  S(l) = sum_i <grad true, grad new>  (symlog)",
    "brute": "brute force: mean rank score per window start",
    "causal": "causal tracing: mean indirect effect at the decisive token",
    "verified": "verified: mean rank score of real edits at the shortlisted window starts",
}


def panel_title(name: str, choice: dict[str, Any]) -> str | None:
    """The panel title of a strategy (LGA variants get their reading), with its stability; None: no panel."""
    from kedit.layers.base import format_stability

    if name.startswith("lga-"):
        title = f"LGA {choice['details'].get('variant', name)}: S(l) per layer (symlog)"
    elif name in PANELS:
        title = PANELS[name]
    else:
        return None
    stab = choice["details"].get("stability")
    return title + (f"\n{format_stability(stab)}" if stab else "")


def plot_layers(result: dict[str, Any], path: str | Path) -> Path:
    """Write the per-layer panels of ``result`` (the layers.json dict) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    strategies = [(k, v) for k, v in result["strategies"].items() if panel_title(k, v)]
    fig, axes = plt.subplots(len(strategies), 1, figsize=(8, 2.6 * len(strategies)), squeeze=False, sharex=True)
    for ax, (name, ch) in zip(axes[:, 0], strategies, strict=True):
        x, y = ch["candidates"], ch["scores"]
        ax.plot(x, y, marker="o", ms=3, lw=1 if name != "verified" else 0, label=name)
        chosen = [c for c in ch["layers"] if c in x] if name not in ("brute", "verified") else ch["layers"][:1]
        ax.scatter(chosen, [y[x.index(c)] for c in chosen], color="red", zorder=3, label=f"chosen {ch['layers']}")
        if name.startswith("lga"):
            lo, hi = ch["details"]["fences"]
            ax.axhline(hi, color="grey", ls="--", lw=0.8, label=f"Tukey fences (k={ch['details']['k']})")
            ax.axhline(lo, color="grey", ls="--", lw=0.8)
            out = [l for l, keep in zip(x, ch["details"]["kept"], strict=True) if not keep]
            ax.scatter(out, [y[x.index(l)] for l in out], marker="x", color="black", zorder=3, label="fenced out")
            ax.set_yscale("symlog", linthresh=max(1e-12, min(abs(v) for v in y if v) if any(y) else 1.0))
        test = result.get("test", {}).get("per_window")
        if name == "brute" and test:
            ax.plot([w[0] for w in test["windows"]], test["mean"], marker=".", lw=1, ls=":", label="test set")
        ax.set_title(panel_title(name, ch), fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("layer")
    fig.suptitle(f"{result.get('model', '?')}  method={result.get('method')}  window={result.get('window')}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
