"""Verified layer selection (METHODS §7): cheap signals shortlist, real edits decide.

The cheap signals (the three LGA scores on W_out from one factored gradient pass, and causal
tracing) each rank the candidate windows; the union of their top choices (round robin, most
bootstrap-stable signal first, after the editor's default window as a safeguard) forms a shortlist
of ``shortlist`` windows. The first
``edits`` proxy requests are then really edited at each shortlisted window (anchors batched per
window, exactly as brute force does) and the window with the best mean rank score wins. The cost
is reported next to an estimate of brute force over every window on the whole proxy set, both without
the covariance statistics (cached and shared across runs; brute force would need them for every layer,
so leaving them out favours brute force).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kedit.arch import ArchitectureAdapter
from kedit.errors import BadRequest
from kedit.eval.datasets import EvalCase
from kedit.layers.base import LayerChoice, bootstrap_stability, candidate_layers, check_proxy, window_starts
from kedit.layers.lga import LGA, SCORES
from kedit.layers.search import TIE_KEYS, as_cases, score_windows
from kedit.layers.trace import CausalTrace
from kedit.requests import EditRequest


def _ranking(cands: list[int], scores: Sequence[float], w: int, keep: Sequence[bool] | None = None) -> list[int]:
    """Window starts (layers) by decreasing window score sum; windows with a fenced-out layer go last."""
    s = [float(v) if math.isfinite(float(v)) else -math.inf for v in scores]
    keep = [True] * len(s) if keep is None else list(keep)
    starts = window_starts(cands, w)
    key = lambda j: (all(keep[j:j + w]), sum(s[j:j + w]), -j)  # noqa: E731
    return [cands[j] for j in sorted(starts, key=key, reverse=True)]


def shortlist_windows(rankings: dict[str, list[int]], k: int, first: Sequence[int] = ()) -> list[int]:
    """Union of the signals' top choices, round robin by rank, until ``k`` window starts (``first`` lead)."""
    out = list(dict.fromkeys(first))[:k]
    depth = max((len(r) for r in rankings.values()), default=0)
    for rank in range(depth):
        for r in rankings.values():
            if len(out) >= k:
                return out
            if rank < len(r) and r[rank] not in out:
                out.append(r[rank])
    return out


@dataclass(frozen=True)
class Verified:
    """Shortlist ``shortlist`` windows from LGA + causal tracing, edit ``edits`` proxy requests at each, pick."""

    name: ClassVar[str] = "verified"
    DEFAULT_EDITS: ClassVar[int] = 5          # m when ``edits`` is None (capped at the proxy size)
    method: str = "rome"
    targets: str = "forward"
    window: int = 1                           # consecutive layers edited (1 for ROME)
    layers: tuple[int, ...] | None = None     # candidate layers; None = every layer
    shortlist: int = 4                        # k: windows really edited (clamped to the number of windows)
    edits: int | None = None                  # m: proxy requests edited per window; None = DEFAULT_EDITS
    include_default: bool = True              # the editor's default window is always on the shortlist
    causal_samples: int = 3                   # noise samples per prompt for the causal-tracing signal
    k: float = 1.0                            # Tukey fence multiplier of the LGA signals
    bootstrap: int = 200                      # resamples for the stability reports (0 = off)
    seed: int = 0
    stats: Any = None                         # {layer: C}, StatsSpec or None (default StatsSpec)
    score_keys: tuple[str, ...] | None = None
    editor_kwargs: dict[str, Any] = field(default_factory=dict)
    signal_proxy: tuple[EditRequest, ...] | None = None  # requests for the signals (zsRE: old=answer, new=alt)

    def __post_init__(self) -> None:
        for name in ("window", "shortlist", "causal_samples"):
            if getattr(self, name) < 1:
                raise BadRequest(f"Verified.{name} must be >= 1, got {getattr(self, name)}")
        if self.edits is not None and self.edits < 1:
            raise BadRequest(f"Verified.edits must be >= 1, got {self.edits}")

    def signals(self, model: torch.nn.Module, adapter: ArchitectureAdapter, tok: Any,
                proxy: Sequence[EditRequest], cands: list[int]) -> dict[str, LayerChoice]:
        """The cheap signals' choices: LGA (every score, one gradient pass) and causal tracing."""
        out: dict[str, LayerChoice] = {}
        t0 = time.perf_counter()
        base = LGA(k=self.k, window=self.window, layers=tuple(cands), score="cosine", bootstrap=self.bootstrap,
                   seed=self.seed)
        gp, cost = base.products(model, adapter, tok, proxy, cands)   # cross products serve all three scores
        share = (time.perf_counter() - t0) / len(SCORES)
        for score in SCORES:
            lga = LGA(k=self.k, window=self.window, layers=tuple(cands), score=score, bootstrap=self.bootstrap,
                      seed=self.seed)
            chosen, rule, S, (lo, hi, keep) = lga.decide(gp, cands)
            stab = bootstrap_stability(lambda w, lga=lga: lga.decide(gp, cands, w)[0][0], len(proxy), chosen[0],
                                       self.bootstrap, self.seed)
            out[lga.label] = LayerChoice(lga.label, chosen, cands, S.tolist(), share, {
                "variant": lga.variant, "fences": [lo, hi], "kept": keep, "rule": rule, "stability": stab,
                "window_score": "sum of layer scores", "n_proxy": len(proxy), "cost": cost})
        out["causal"] = CausalTrace(samples=self.causal_samples, seed=self.seed, window=self.window,
                                    layers=tuple(cands), bootstrap=self.bootstrap).select(model, adapter, tok, proxy)
        return out

    def select(self, model: torch.nn.Module, adapter: ArchitectureAdapter | None, tok: Any,
               proxy: Sequence[EditRequest | EvalCase]) -> LayerChoice:
        """Shortlist from the signals, verify with real edits, choose. Model left unchanged; BadRequest on bad input."""
        from kedit.editor import default_layers

        t0 = time.perf_counter()
        cases = as_cases(proxy)
        check_proxy([c.request for c in cases], who="verified layer selection")
        # defaults: k * m = 20 edits vs n * W for brute force (300 for 10 requests x 30 layers), so with the
        # signals the whole selection stays under 1/10 of brute force on the same proxy set
        m = self.edits if self.edits is not None else min(self.DEFAULT_EDITS, len(cases))
        if m > len(cases):
            raise BadRequest(f"verified layer selection: edits={m} but the proxy set has only {len(cases)} requests")
        adapter = adapter or ArchitectureAdapter.from_model(model)
        cands = candidate_layers(adapter, self.layers, self.window)
        windows = {cands[j]: cands[j:j + self.window] for j in window_starts(cands, self.window)}
        signal_reqs = check_proxy(list(self.signal_proxy) if self.signal_proxy else [c.request for c in cases],
                                  need_true=True, who="verified layer selection (cheap signals)")
        sig = self.signals(model, adapter, tok, signal_reqs, cands)
        t_signals = time.perf_counter() - t0
        # round robin over the signals, most stable first: an unstable signal's top choice is cut first
        order = sorted(sig, key=lambda n: -((sig[n].details.get("stability") or {}).get("fraction") or 0.0))
        rankings = {name: _ranking(sig[name].candidates, sig[name].scores, self.window, sig[name].details.get("kept"))
                    for name in order}
        default = default_layers(adapter.n_layers, self.window > 1)[0]
        first = [default] if self.include_default and default in windows else []
        k = min(self.shortlist, len(windows))
        short = shortlist_windows(rankings, k, first)
        t1 = time.perf_counter()
        ws = score_windows(model, tok, cases[:m], [windows[s] for s in short], self.method, self.targets,
                           self.score_keys, self.stats, self.seed, editor_kwargs=self.editor_kwargs)
        t_edits = time.perf_counter() - t1
        mean, mean_tie = ws.score.nanmean(0), ws.tie.nanmean(0)
        best = ws.best(mean, mean_tie)
        stability = bootstrap_stability(
            lambda w: short[ws.best((w[:, None] * ws.score.nan_to_num(0.0)).sum(0) / w.sum(),
                                    (w[:, None] * ws.tie.nan_to_num(0.0)).sum(0) / w.sum())],
            m, short[best], self.bootstrap, self.seed)
        # brute force = the same per-window edit cost for every window and every proxy request, and the
        # pre-edit measurement of every proxy request; statistics left out of both sides (docstring)
        t_stats, t_pre = ws.seconds["stats"], ws.seconds["pre"]
        per_window = (t_edits - t_stats - t_pre) / max(1, len(short))
        brute_est = t_pre * len(cases) / m + per_window * len(windows) * len(cases) / m
        seconds = time.perf_counter() - t0
        details = {
            "method": self.method, "targets": self.targets, "window": self.window, "shortlist": short,
            "shortlist_size": k, "edits": m, "n_proxy": len(cases), "n_signal_proxy": len(signal_reqs),
            "default_window_start": default if first else None,
            "signals": {n: {"layers": c.layers, "variant": c.details.get("variant", n), "seconds": c.seconds,
                            "stability": c.details.get("stability"), "ranking": rankings[n],
                            "candidates": c.candidates, "scores": c.scores} for n, c in sig.items()},
            "verified_scores": dict(zip(short, mean.tolist(), strict=True)),
            "score_keys": list(ws.keys), "tie_break": list(TIE_KEYS.get(cases[0].kind, ())),
            "per_request": ws.score.tolist(), "failures": ws.failures, "stability": stability,
            "stability_note": "bootstrap over the verified edits; the shortlist itself is held fixed",
            "cost": {"seconds": seconds, "signals_seconds": t_signals, "edit_seconds": t_edits - t_stats,
                     "stats_seconds": t_stats, "edits": m * len(short), "brute_force_edits": len(cases) * len(windows),
                     "brute_force_seconds_estimate": brute_est,
                     "fraction_of_brute_force": (seconds - t_stats) / brute_est if brute_est > 0 else None,
                     "fraction_excludes": "covariance statistics (cached; brute force needs them for every layer)"},
            "candidates_are": "first layer of each shortlisted window",
        }
        return LayerChoice("verified", windows[short[best]], short, mean.tolist(), seconds, details)
