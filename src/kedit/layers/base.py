"""Shared parts of the layer selectors (METHODS §7): LayerChoice, the selector protocol, candidate-layer
validation, proxy-set checks, Tukey fences, best-window search and bootstrap stability.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from kedit.errors import BadRequest
from kedit.requests import EditRequest


@dataclass
class LayerChoice:
    """What a selector chose and why.

    ``scores[j]`` belongs to ``candidates[j]`` (higher = better for every strategy); ``layers`` is
    the chosen layer, or the chosen window of consecutive layers for multi-layer editors.
    """

    strategy: str
    layers: list[int]
    candidates: list[int]
    scores: list[float]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        """The chosen layer (the last of a window: where MEMIT-style editors put the anchor)."""
        return self.layers[-1]

    def by_layer(self) -> dict[int, float]:
        return dict(zip(self.candidates, self.scores, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (recorded in RunRecords and ``layers.json``)."""
        return asdict(self)


class LayerSelector(Protocol):
    name: str

    def select(self, model: torch.nn.Module, adapter: Any, tok: Any, proxy: Sequence[EditRequest]) -> LayerChoice: ...


def check_proxy(proxy: Sequence[Any], need_true: bool = False,
                who: str = "layer selection") -> list[EditRequest]:
    """The proxy requests as a list (EvalCases give their request); BadRequest if empty or lacking target_true."""
    proxy = [getattr(r, "request", r) for r in proxy]
    if not proxy:
        raise BadRequest(f"{who}: the proxy set is empty; give at least one edit request")
    for i, r in enumerate(proxy):
        if not isinstance(r, EditRequest):
            raise BadRequest(f"{who}: proxy item {i} is a {type(r).__name__}, not an EditRequest")
        if need_true and r.target_true is None:
            where = r.case_id if r.case_id is not None else f"#{i}"
            raise BadRequest(f"{who}: request {where} ({r.filled!r}) has no target_true, which this strategy needs")
    return proxy


def candidate_layers(adapter: Any, layers: Sequence[int] | None, window: int = 1) -> list[int]:
    """Sorted unique candidate layers (all layers if None); BadRequest naming the valid range.

    With ``window > 1`` at least one run of ``window`` consecutive candidates must exist.
    """
    if window < 1:
        raise BadRequest(f"window must be >= 1, got {window}")
    if window > adapter.n_layers:
        raise BadRequest(f"a window of {window} layers is longer than the model ({adapter.n_layers} layers)")
    if layers is None:
        cands = list(range(adapter.n_layers))
    else:
        cands = sorted({int(l) for l in layers})
        if not cands:
            raise BadRequest("the candidate layer list is empty")
        bad = [l for l in cands if not 0 <= l < adapter.n_layers]
        if bad:
            raise BadRequest(f"candidate layers {bad} are out of range: "
                             f"this model has layers 0..{adapter.n_layers - 1}")
    if not window_starts(cands, window):
        raise BadRequest(f"no {window} consecutive layers among the candidates {cands}")
    return cands


def tukey_fences(scores: Sequence[float] | torch.Tensor, k: float = 1.0) -> tuple[float, float, list[bool]]:
    """Tukey's fences ``[Q1 - k IQR, Q3 + k IQR]`` and which scores lie inside them.

    Quartiles use linear interpolation between order statistics (numpy's default). ``k < 0``
    raises ValueError; ``k = inf`` keeps everything.
    """
    if k < 0:
        raise ValueError(f"Tukey fence multiplier k must be >= 0, got {k}")
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError("no scores to fence")
    q1, q3 = torch.quantile(s, 0.25).item(), torch.quantile(s, 0.75).item()
    iqr = q3 - q1
    # k = inf with iqr = 0 would give nan; treat it as "no fences"
    lo, hi = (-float("inf"), float("inf")) if k == float("inf") else (q1 - k * iqr, q3 + k * iqr)
    return lo, hi, [lo <= v <= hi for v in s.tolist()]


def window_starts(cands: list[int], w: int) -> list[int]:
    """Start indices j (into ``cands``) of runs ``cands[j:j+w]`` of consecutive layers."""
    return [j for j in range(len(cands) - w + 1) if cands[j + w - 1] - cands[j] == w - 1]


def best_window(cands: list[int], scores: Sequence[float], w: int = 1,
                keep: Sequence[bool] | None = None, lo: float | None = None,
                hi: float | None = None) -> tuple[list[int], str]:
    """The ``w`` consecutive candidate layers with the largest score sum, and the rule used.

    Fenced-out layers (``keep[j]`` False) are never chosen: windows containing one are skipped.
    If every window contains one, the scores are winsorised to ``[lo, hi]`` instead (an outlier then
    counts as the fence value) and the rule says so. ``w = 1`` is the plain fenced argmax.
    """
    s = [float(v) for v in scores]
    keep = [True] * len(s) if keep is None else list(keep)
    starts = window_starts(cands, w)
    if not starts:
        raise ValueError(f"no {w} consecutive layers among the candidates {cands}")
    clean = [j for j in starts if all(keep[j:j + w])]
    if clean:
        j = max(clean, key=lambda j: (sum(s[j:j + w]), -j))  # ties -> shallowest window
        return cands[j:j + w], "fenced" if not all(keep) else "argmax"
    lo = -float("inf") if lo is None else lo
    hi = float("inf") if hi is None else hi
    clipped = [min(max(v, lo), hi) for v in s]
    j = max(starts, key=lambda j: (sum(clipped[j:j + w]), -j))
    return cands[j:j + w], "winsorised"


def bootstrap_stability(choose: Callable[[torch.Tensor], int], n: int, chosen: int, resamples: int = 200,
                        seed: int = 0) -> dict[str, Any] | None:
    """How often a choice survives resampling the proxy requests (with replacement).

    ``choose(weights [n])`` re-runs the whole decision (fences included) with request ``i`` counted
    ``weights[i]`` times and returns the chosen window's first layer. Returns the fraction of the
    ``resamples`` draws that pick ``chosen``, the top-3 alternatives with their frequencies and the
    proxy size; None when ``resamples`` is 0. Seeded, so the same inputs give the same report.
    """
    if resamples < 0:
        raise BadRequest(f"bootstrap resamples must be >= 0, got {resamples}")
    if resamples == 0:
        return None
    gen = torch.Generator().manual_seed(seed)
    picks = Counter()
    for _ in range(resamples):
        weights = torch.bincount(torch.randint(n, (n,), generator=gen), minlength=n).double()
        picks[choose(weights)] += 1
    alternatives = [[start, c / resamples] for start, c in picks.most_common() if start != chosen][:3]
    return {"fraction": picks[chosen] / resamples, "chosen": chosen, "alternatives": alternatives,
            "resamples": resamples, "seed": seed, "n_proxy": n, "unit": "first layer of the window"}


def format_stability(stab: dict[str, Any] | None) -> str:
    """``"stability 0.62 over 200 resamples of 20 (alternatives 3: 0.21, 8: 0.10)"`` or ``"stability n/a"``."""
    if not stab:
        return "stability n/a"
    alt = ", ".join(f"{s}: {f:.2f}" for s, f in stab["alternatives"])
    return (f"stability {stab['fraction']:.2f} over {stab['resamples']} resamples of {stab['n_proxy']}"
            + (f" (alternatives {alt})" if alt else ""))
